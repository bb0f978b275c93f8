"""Reading `kvgen generate --prompts-file`: one prompt per line, or JSON Lines."""

import json
from pathlib import Path

from ..errors import KvgenError

# Keywords a JSON Lines entry may set for its own request, over the command line's.
REQUEST_KEYS = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")


def read_prompts_file(path) -> list:
    """Return the prompts in a file: strings, or dicts of request keywords from JSON Lines.

    A file named *.jsonl (or *.ndjson) holds one JSON value per line: a string, or an object
    with "prompt" and any of max_new_tokens, temperature, top_k, top_p, seed, stop. Any other
    file holds one prompt per line. Blank lines are skipped either way.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise KvgenError(f"{path}: not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x})"
                         ) from None
    json_lines = path.suffix.lower() in (".jsonl", ".ndjson")
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        prompts.append(_json_prompt(path, number, line) if json_lines else line)
    if not prompts:
        raise KvgenError(f"{path}: no prompts (blank lines are skipped)")
    return prompts


def _json_prompt(path: Path, number: int, line: str):
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise KvgenError(f"{path}:{number}: not valid JSON ({e})") from None
    if isinstance(value, str):
        return value
    if not isinstance(value, dict) or not isinstance(value.get("prompt"), (str, list)):
        raise KvgenError(f"{path}:{number}: expected a string or an object with a \"prompt\" "
                         f"(text or token ids), got {line.strip()[:80]!r}")
    unknown = sorted(set(value) - set(REQUEST_KEYS))
    if unknown:
        raise KvgenError(f"{path}:{number}: unknown key {unknown[0]!r}; expected "
                         f"{', '.join(REQUEST_KEYS)}")
    return value
