import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"


def require_stories():
    if not (STORIES / "stories260K.bin").exists():
        pytest.skip(f"reference model not found at {STORIES}")


@pytest.fixture(scope="session")
def stories_llm():
    """stories260K loaded once: tests must not depend on state left by another test."""
    require_stories()
    import kvgen

    return kvgen.load(STORIES / "stories260K.bin")


@pytest.fixture(scope="session")
def goldens():
    require_stories()
    return json.loads((STORIES / "goldens.json").read_text())


@pytest.fixture(scope="session")
def stories_hf_dir(tmp_path_factory):
    """stories260K converted to a Hugging Face directory by `kvgen convert`."""
    require_stories()
    from kvgen.convert import convert_llama2c

    out = tmp_path_factory.mktemp("stories_hf")
    return convert_llama2c(STORIES / "stories260K.bin", out, tokenizer=STORIES / "tok512.bin")


def pytest_configure(config):
    """Run the suite on one thread, subprocesses included: these models are tiny, and when
    another process holds the other core, threads waiting on each other at every decode step
    turn one second into forty. Exactness does not depend on the thread count."""
    import os

    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
