"""kvgen: text generation for decoder-only transformers, built around the key/value cache."""

__version__ = "0.1.0"

from .errors import KvgenError  # noqa: E402
from .llm import LLM, GenerationResult, load  # noqa: E402

__all__ = ["KvgenError", "LLM", "GenerationResult", "load", "__version__"]
