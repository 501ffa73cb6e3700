"""gunicorn defaults for a bare `gunicorn server:app` run from the repository root (see nanoqwen/gunicorn_conf.py)."""
from nanoqwen.gunicorn_conf import *  # noqa: F401,F403
