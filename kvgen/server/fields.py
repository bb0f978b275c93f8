"""Checks for one JSON field each: the value, or its default when absent or null, or a 400 that
names the parameter and the value it got."""

import math

from .errors import ApiError

_SHOWN_CHARS = 60  # an echoed bad value is cut here: the body may be a megabyte of it


def show(value) -> str:
    """Return a short repr of a bad value for an error message."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param} {message}", param=param)


def integer(body: dict, name: str, default, lo: int, hi: int | None = None):
    """Return body[name] as an int in [lo, hi], or default."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad(name, f"must be an integer, got {show(value)}")
    if value < lo or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad(name, f"must be an integer {bounds}, got {show(value)}")
    return value


def number(body: dict, name: str, default: float, lo: float, hi: float | None = None, *,
           lo_open: bool = False) -> float:
    """Return body[name] as a float in [lo, hi] (or (lo, hi] with lo_open), or default."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not _finite(value):
        raise bad(name, f"must be a finite number, got {show(value)}")
    if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        low = f"({lo}" if lo_open else f"[{lo}"
        high = f"{hi}]" if hi is not None else "inf)"
        raise bad(name, f"must be in {low}, {high}, got {show(value)}")
    return float(value)


def _finite(value) -> bool:
    try:
        return math.isfinite(value)  # JSON's 1e400 reads as inf; 10**400 overflows a float
    except OverflowError:
        return False


def boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, f"must be true or false, got {show(value)}")
    return value


def string(body: dict, name: str, default: str | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise bad(name, f"must be a string, got {show(value)}")
    return text(name, value)


def text(param: str, value: str) -> str:
    """Return value after checking that it is valid Unicode (JSON escapes can make lone
    surrogates, which no tokenizer can encode)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(param, "holds a lone surrogate (\\ud800-\\udfff), not valid Unicode") from None
    return value


def stop_strings(body: dict, max_count: int) -> list[str]:
    """Return body["stop"], a string or a list of non-empty strings, as a list."""
    value = body.get("stop")
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(s, str) and s for s in values):
        raise bad("stop", f"must be a non-empty string or a list of them, got {show(value)}")
    if len(values) > max_count:
        raise bad("stop", f"may hold at most {max_count} strings, got {len(values)}")
    return [text("stop", s) for s in values]


def unsupported(body: dict, allowed: dict[str, tuple]):
    """Refuse a field this server does not implement unless it is absent, null, or one of the
    values that mean "off" (frequency_penalty 0, logit_bias {}...)."""
    for name, neutral in allowed.items():
        value = body.get(name)
        if value is not None and value not in neutral:
            raise bad(name, f"is not supported by this server, got {show(value)}")
