"""The serving benchmark runs end to end and its JSON holds ratios of its own measurements."""

import json
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "benchmarks" / "engine_bench.py"


def test_quick_run_writes_consistent_json(tmp_path, monkeypatch, capsys):
    out = tmp_path / "engine.json"
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--quick", "--skip-one-at-a-time",
                                      "--json", str(out)])
    runpy.run_path(str(BENCH), run_name="__main__")

    report = json.loads(out.read_text())
    engine, static = report["modes"]
    assert engine["engine_speedup"] == 1.0
    assert static["mode"].startswith("static") and static["seconds"] > 0
    assert abs(static["engine_speedup"] - static["seconds"] / engine["seconds"]) < 1e-9
    assert abs(engine["tokens_per_s"] * engine["seconds"] - report["new_tokens"]) < 1e-6
    assert report["kv_bytes"]["engine_peak"] <= report["kv_budget_bytes"]
    assert report["ttft"]["hit_tokens"] > 0 and report["ttft"]["miss_s"] > 0
    assert f"{static['engine_speedup']:.2f}x" in capsys.readouterr().out
