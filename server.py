"""WSGI entry point: `gunicorn server:app` (settings in gunicorn.conf.py; `nanoqwen serve` runs it from anywhere)."""
from nanoqwen.wsgi import app, engine  # noqa: F401
