"""WSGI entry point: `gunicorn server:app` (settings in gunicorn.conf.py; `-k gevent` is the default there).

Importing this module starts the engine: gunicorn imports it in each worker after forking (the
app is not preloaded), so the engine's thread lives in the worker that serves the requests. The
model loads in that thread while the worker already answers `/health` with 503.
"""
import atexit

from nanoqwen.api.app import create_app
from nanoqwen.api.config import ServerConfig
from nanoqwen.engine import Engine, EngineConfig

engine = Engine(EngineConfig.from_env())
engine.start()
atexit.register(engine.shutdown)
app = create_app(engine, ServerConfig.from_env())
