"""nanoqwen: a small, fast, OpenAI-compatible inference server for Qwen3."""
