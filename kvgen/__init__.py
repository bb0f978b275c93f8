"""kvgen: text generation for decoder-only transformers, built around the key/value cache."""

__version__ = "0.1.0"

from .errors import KvgenError  # noqa: E402
from .engine import Engine  # noqa: E402
from .llm import LLM, GenerationResult, load  # noqa: E402
from .planner import plan  # noqa: E402

__all__ = ["Engine", "KvgenError", "LLM", "GenerationResult", "load", "plan",
           "__version__"]
