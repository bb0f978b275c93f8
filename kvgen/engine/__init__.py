"""The serving engine: a paged KV cache shared by many requests, continuous batching, prefix
caching and preemption."""

from .engine import Engine
from .outputs import EngineStats, RequestOutput
from .paged_cache import parse_memory

__all__ = ["Engine", "EngineStats", "RequestOutput", "parse_memory"]
