"""Bad input: one line naming the problem, a non-zero exit, no traceback."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import STORIES
from kvgen.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    if code != 0:  # a refused run writes nothing to stdout, not even the prompt
        assert captured.out == "", captured.out
    return code, captured.err


def _assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kvgen: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def hf_copy(stories_hf_dir, tmp_path):
    """A private copy of the converted stories260K directory that a test may damage."""
    out = tmp_path / "model"
    shutil.copytree(stories_hf_dir, out)
    return out


def _gen(model, *extra):
    return ("generate", "--model", str(model), "--prompt", "Once upon a time",
            "--max-new-tokens", "4", *extra)


def test_missing_model_path(capsys, tmp_path):
    code, err = _run(capsys, *_gen(tmp_path / "nowhere"))
    _assert_one_line_error(code, err, "nowhere", "does not exist")


def test_unknown_model_type(capsys, hf_copy):
    config = json.loads((hf_copy / "config.json").read_text())
    config["model_type"] = "wizard"
    (hf_copy / "config.json").write_text(json.dumps(config))
    code, err = _run(capsys, *_gen(hf_copy))
    _assert_one_line_error(code, err, "model_type", "wizard")


def test_weight_file_missing_a_tensor(capsys, hf_copy):
    tensors = load_file(hf_copy / "model.safetensors")
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, hf_copy / "model.safetensors")
    code, err = _run(capsys, *_gen(hf_copy))
    _assert_one_line_error(code, err, "layers.3.mlp.w_up.weight")


def test_weight_of_wrong_shape(capsys, hf_copy):
    tensors = load_file(hf_copy / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, hf_copy / "model.safetensors")
    code, err = _run(capsys, *_gen(hf_copy))
    _assert_one_line_error(code, err, "layers.1.attn.wk.weight", "(16, 64)", "(32, 64)")


def test_truncated_safetensors(capsys, hf_copy):
    path = hf_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:50_000])
    code, err = _run(capsys, *_gen(hf_copy))
    _assert_one_line_error(code, err, "model.safetensors", "truncated")


def test_truncated_llama2c_checkpoint(capsys, tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes((STORIES / "stories260K.bin").read_bytes()[:500_000])
    code, err = _run(capsys, *_gen(path, "--tokenizer", str(STORIES / "tok512.bin")))
    _assert_one_line_error(code, err, "short.bin")


def test_prompt_too_long(capsys):
    code, err = _run(capsys, "generate", "--model", str(STORIES / "stories260K.bin"),
                     "--prompt", "Once upon a time", "--max-new-tokens", "600")
    _assert_one_line_error(code, err, "600", "context of 512")


@pytest.mark.parametrize("flag,value,needle", [
    ("--max-new-tokens", "-1", "max_new_tokens"),
    ("--temperature", "-0.5", "temperature"),
    ("--top-p", "0", "top_p"), ("--top-p", "1.01", "top_p"),
    ("--top-k", "-3", "top_k"),
])
def test_bad_generation_values(capsys, flag, value, needle):
    code, err = _run(capsys, "generate", "--model", str(STORIES / "stories260K.bin"),
                     "--prompt", "hi", flag, value)
    _assert_one_line_error(code, err, needle, value)


def test_bad_input_as_a_user_sees_it(tmp_path):
    """Through a real process: exit status 1, one line on stderr, nothing on stdout."""
    proc = subprocess.run([sys.executable, "-m", "kvgen", *_gen(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stdout == ""
    _assert_one_line_error(proc.returncode, proc.stderr, "does not exist")


def test_errors_do_not_touch_convert_output(capsys, stories_hf_dir):
    """convert refuses to overwrite an existing directory's files without --overwrite."""
    before = (stories_hf_dir / "model.safetensors").read_bytes()
    code, err = _run(capsys, "convert", str(STORIES / "stories260K.bin"), str(stories_hf_dir))
    _assert_one_line_error(code, err, "--overwrite")
    assert (stories_hf_dir / "model.safetensors").read_bytes() == before


def test_absurd_thread_counts(capsys):
    # 100000 threads used to reach PyTorch's OpenMP runtime and end in a segmentation fault.
    for value in ("0", "100000"):
        code, err = _run(capsys, *_gen(STORIES / "stories260K.bin", "--threads", value))
        _assert_one_line_error(code, err, "--threads", value)


def test_prompts_file_that_is_not_text(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xff\xfeOnce upon a time\n")
    code, err = _run(capsys, "generate", "--model", str(STORIES / "stories260K.bin"),
                     "--prompts-file", str(prompts))
    _assert_one_line_error(code, err, str(prompts), "not UTF-8", "0xff")


def test_a_cache_that_cannot_be_allocated(capsys, monkeypatch, tmp_path):
    """What a budget like --kv-cache-memory 1000TB met (simulated: a real attempt could wake
    the OOM killer on a machine that overcommits memory)."""
    def refuse(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                           "500000000000000 bytes.\nmore detail")

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\nThe cat\n")
    monkeypatch.setattr("kvgen.cache.torch.zeros", refuse)
    code, err = _run(capsys, "generate", "--model", str(STORIES / "stories260K.bin"),
                     "--prompts-file", str(prompts), "--kv-cache-memory", "1000TB")
    _assert_one_line_error(code, err, "cannot allocate", "KV cache", "can't allocate memory")


def test_bench_refuses_before_it_runs(capsys, tmp_path, monkeypatch):
    """A bad --plot folder or engine name is refused before any model is built or loaded."""
    monkeypatch.setattr("kvgen.bench._random_model", lambda *a: pytest.fail("model built"))
    code, err = _run(capsys, "bench", "--shape", "tiny", "--plot",
                     str(tmp_path / "missing" / "x.png"))
    _assert_one_line_error(code, err, "--plot", "does not exist")
    code, err = _run(capsys, "bench", "--shape", "tiny", "--engine", "foo")
    _assert_one_line_error(code, err, "unknown engine", "foo")
