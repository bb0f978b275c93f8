"""Building the C kernels: cached per source and machine, and a missing or failing compiler
means PyTorch routes (a warning), never an error."""

import logging
import shutil

import pytest

from kvgen import native

needs_compiler = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")),
                                    reason="no C compiler here")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Nothing loaded yet, and an empty cache directory."""
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    return tmp_path


@needs_compiler
def test_a_build_is_cached_and_reused(fresh, monkeypatch):
    assert native.load("matvec") is not None
    built = list((fresh / "kvgen").glob("matvec-*.so"))
    assert len(built) == 1

    # A new process (nothing loaded) finds the build instead of compiling again.
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt"))
    assert native.load("matvec") is not None


def test_no_compiler_gives_none_and_a_warning(fresh, monkeypatch, caplog):
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="kvgen.native"):
        assert native.load("matvec") is None
    assert "no C compiler" in caplog.text


@pytest.mark.parametrize("compiler", ["/bin/false", "/nonexistent/cc"])
def test_a_failing_compiler_gives_none_and_a_warning(fresh, monkeypatch, caplog, compiler):
    monkeypatch.setenv("CC", compiler)
    with caplog.at_level(logging.WARNING, logger="kvgen.native"):
        assert native.load("paged_attention") is None
        assert native.load("matvec") is None  # fails for the same reason: not warned again
    assert "failed" in caplog.text
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert not list((fresh / "kvgen").glob("*.so"))  # no half-built file left behind
