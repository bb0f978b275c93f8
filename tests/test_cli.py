"""The command line as a user runs it."""

import subprocess
import sys

import pytest

from conftest import STORIES, require_stories


def kvgen(*args):
    return subprocess.run([sys.executable, "-m", "kvgen", *args], capture_output=True, text=True)


def test_generate_streams_text_and_ends_with_stats(goldens):
    require_stories()
    case = next(c for c in goldens["cases"] if c["prompt"] == "The little dog"
                and c["steps"] == 64)
    proc = kvgen("generate", "--model", str(STORIES), "--prompt", "The little dog",
                 "--max-new-tokens", "60", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == case["text"] + "\n"  # the prompt, then the text, as run.c prints
    stats = proc.stderr.strip().splitlines()[-1]
    for field in ("prompt tokens 5", "new tokens 60", "prefill", "time to first token",
                  "tokens/s", "KV cache 81920 bytes"):  # 2*5 layers*4 heads*8*64 slots*4 bytes
        assert field in stats


def test_no_cache_gives_the_same_text():
    require_stories()
    args = ("generate", "--model", str(STORIES / "stories260K.bin"), "--prompt", "Lily",
            "--max-new-tokens", "30", "--temperature", "0")
    assert kvgen(*args).stdout == kvgen(*args, "--no-cache").stdout


def test_several_prompts():
    require_stories()
    proc = kvgen("generate", "--model", str(STORIES), "--prompt", "Once", "--prompt",
                 "The little dog was", "--max-new-tokens", "10", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--- [") == 2


def test_version_and_help():
    import kvgen as package

    assert kvgen("--version").stdout.strip() == f"kvgen {package.__version__}"
    for command in ([], ["generate"], ["convert"]):
        proc = kvgen(*command, "--help")
        assert proc.returncode == 0 and "usage: kvgen" in proc.stdout


@pytest.mark.parametrize("args", [["generate"], ["convert"], ["nonsense"]])
def test_usage_errors_exit_non_zero(args):
    proc = kvgen(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_convert_writes_a_loadable_directory(tmp_path):
    require_stories()
    out = tmp_path / "hf"
    proc = kvgen("convert", str(STORIES / "stories260K.bin"), str(out), "--tokenizer",
                  str(STORIES / "tok512.bin"))
    assert proc.returncode == 0, proc.stderr
    proc = kvgen("generate", "--model", str(out), "--prompt", "Once upon a time",
                 "--max-new-tokens", "20", "--temperature", "0")
    assert proc.stdout.startswith("Once upon a time, there was a little girl named Lily.")
