"""`lowbit serve`: an OpenAI-compatible server with canary routing, shadow scoring and fallback to the
full-precision model (docs/serve.md)."""

from lowbit.serve.app import create_app, run
from lowbit.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app", "run"]
