"""`kvgen bench` end to end on a tiny random model: fields, plot, ratios from the measurements.
No speed is asserted: these machines are shared and noisy."""

import json

import pytest

from kvgen.bench import bench
from kvgen.cli import main
from kvgen.errors import KvgenError

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def report():
    return bench(shape="tiny", batches=[1, 2], prompt_len=8, new_tokens=12, repeats=1)


def test_every_engine_and_batch_measured(report):
    engines = {"kvgen cache", "kvgen no-cache", "transformers cache", "transformers no-cache"}
    assert {(r.engine, r.batch) for r in report.runs} == {(e, b) for e in engines for b in (1, 2)}
    for r in report.runs:
        assert len(r.step_s) == 12 and all(s > 0 for s in r.step_s)
        assert r.ttft_s == r.step_s[0]
        assert r.prefill_tokens_per_s == pytest.approx(r.batch * 8 / r.ttft_s)
        assert r.decode_tokens_per_s == pytest.approx(r.batch * 11 / sum(r.step_s[1:]))


def test_predictions_and_ratios_come_from_the_run(report):
    for pred, ratios in zip(report.predictions, report.ratios()):
        runs = {r.engine: r for r in report.runs if r.batch == pred.batch}
        # The planner's cache bytes are what kvgen allocated.
        assert runs["kvgen cache"].kv_cache_bytes == pred.kv_cache_bytes
        assert ratios["kvgen uncached/cached time"] == pytest.approx(
            runs["kvgen no-cache"].total_s / runs["kvgen cache"].total_s)
        kvgen_rate = runs["kvgen cache"].decode_tokens_per_s
        assert ratios["decode tokens/s kvgen/transformers"] == pytest.approx(
            kvgen_rate / runs["transformers cache"].decode_tokens_per_s)
        assert ratios["planner FLOP ratio"] > 1
        assert 0 < ratios["achieved fraction of read bandwidth"]


def test_cli_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "bench.png"
    code = main(["bench", "--shape", "tiny", "--prompt-len", "4", "--new-tokens", "6",
                 "--repeats", "1", "--engine", "kvgen cache", "--engine", "kvgen no-cache",
                 "--json", "--plot", str(plot)])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert {r["engine"] for r in data["runs"]} == {"kvgen cache", "kvgen no-cache"}
    assert "kvgen uncached/cached time" in data["ratios"][0]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,needle", [
    (["--shape", "huge"], "unknown shape"),
    (["--shape", "tiny", "--new-tokens", "0"], "new_tokens"),
    (["--shape", "tiny", "--engine", "vllm"], "vllm"),
    (["--shape", "tiny", "--prompt-len", "250", "--new-tokens", "10"], "context"),
])
def test_bad_input(capsys, argv, needle):
    assert main(["bench", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and needle in err[-1] and "Traceback" not in "".join(err)


def test_needs_a_model_or_a_shape():
    with pytest.raises(KvgenError, match="exactly one"):
        bench()


def test_llama2c_checkpoint_and_compiled_engine():
    """A llama2.c file is benchmarked through its converted HF directory; the compiled engine
    reports its compilation as warm-up, apart from the measured runs."""
    import shutil

    from conftest import STORIES, require_stories

    require_stories()
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    report = bench(STORIES / "stories260K.bin", prompt_len=4, new_tokens=6, repeats=1,
                   engines=["kvgen cache compiled", "transformers cache"])
    runs = {r.engine: r for r in report.runs}
    assert set(runs) == {"kvgen cache compiled", "transformers cache"}
    assert runs["kvgen cache compiled"].warmup_s > 0
    assert report.ratios()[0]["decode tokens/s kvgen compiled/transformers"] == pytest.approx(
        runs["kvgen cache compiled"].decode_tokens_per_s
        / runs["transformers cache"].decode_tokens_per_s)
