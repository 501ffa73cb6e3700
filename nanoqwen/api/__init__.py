"""The OpenAI-compatible HTTP layer over the engine (`server.py` builds the app from it)."""
