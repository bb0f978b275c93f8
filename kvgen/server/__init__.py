"""An OpenAI-compatible HTTP server on the serving engine: `kvgen serve`, or create_app(llm)
under any ASGI server."""

from .app import create_app, default_model_name

__all__ = ["create_app", "default_model_name"]
