"""harness.fuzz.sanitize: `fuzz --sanitizer-every N` on the cpu backend under the stand-in
compute-sanitizer (tests/sanitizer_fake.py): corpus entries and findings replayed under
memcheck while the fuzzer runs, reports attached to their files, sanitizer errors on corpus
entries stored as findings, and one clear error where memcheck cannot run."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from harness import corpus
from harness.cli import main
from harness.errors import ConfigError
from harness.fuzz import codec
from harness.fuzz.engine import RUN_DIR, SANITIZE_DIR, FuzzConfig, codec_limits, fuzz
from harness.fuzz.sanitize import BackgroundSanitizer, is_sanitizer_signature
from harness.fuzz.store import FindingStore

FAKE = Path(__file__).with_name("sanitizer_fake.py")
#: a variant the fuzzer reaches in a few dozen executions (every LoRA slot active)
EASY = "lora-grid-off-by-one"
#: the stand-in's record in the gating stage of every case of a batch
GATING_ERROR = "gating:sanitizer-invalid-global-write-out-of-bounds"


@pytest.fixture
def fake_sanitizer(tmp_path, monkeypatch):
    """A `compute-sanitizer` on PATH that runs tests/sanitizer_fake.py (no records unless a
    test sets FAKE_ERROR_AT)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "compute-sanitizer"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    for var in ("FAKE_MODE", "FAKE_ERROR_AT", "FAKE_ONLY_WITH_BUGS", "FAKE_HANG_CASE",
                "FAKE_KILL_CASE", "FAKE_LOSE_CONTEXT_CASE", "FAKE_PY_FRAMES"):
        monkeypatch.delenv(var, raising=False)
    return exe


def _sanitized_corpus(findings_dir: Path) -> list[tuple[Path, dict]]:
    """The sanitized corpus entries of the (only) campaign run on `findings_dir`."""
    (run,) = (findings_dir / RUN_DIR).iterdir()
    d = run / SANITIZE_DIR / "corpus"
    return [(p, json.loads(p.read_text())["meta"]) for p in sorted(d.glob("*.json"))]


def test_corpus_entries_and_findings_are_sanitized(fake_sanitizer, tmp_path):
    report = fuzz(FuzzConfig(bugs=(EASY,), seconds=None, runs=60, seed=2, minimize=False,
                             findings_dir=tmp_path / "findings", sanitizer_every=1))
    s = report.status
    assert report.findings and s.sanitizer_errors == 0 and not report.sanitizer_problems
    for f in report.findings:  # the replay finds the finding again, memcheck nothing
        _, meta = corpus.load(f.path)
        assert meta.extra["sanitizer"]["memcheck"] == {"status": "findings", "errors": 0,
                                                       "reports": []}
        assert meta.signature == f.signature  # the rest of the metadata is kept
    entries = _sanitized_corpus(report.config.findings_dir)
    assert entries and s.sanitized == len(entries) + len(report.findings)
    limits = codec_limits("cpu")
    checked = 0
    for path, meta in entries:
        assert meta["extra"]["sanitizer"]["memcheck"]["status"] in ("clean", "findings",
                                                                    "rejected")
        raw = report.config.corpus_dir / meta["extra"]["corpus_file"]
        if raw.exists():  # libFuzzer may since have replaced it by a smaller input
            assert corpus.content_hash(codec.decode(raw.read_bytes(), limits)) == path.stem
            checked += 1
    assert checked
    assert report.to_json()["sanitized"] == s.sanitized


def test_every_nth_new_corpus_entry(fake_sanitizer, tmp_path):
    """Entries there before it started are not new; of seven new ones, the 3rd and 6th (in
    the order they were written) are sanitized, each decoded with the engine's limits."""
    cdir = tmp_path / "corpus"
    cdir.mkdir()
    (cdir / "old").write_bytes(b"\x01\x02")
    san = BackgroundSanitizer(3, "cpu", (), FindingStore(tmp_path / "findings"), cdir,
                              tmp_path / "work", codec_limits("cpu"))
    for k in range(7):
        (cdir / f"e{k}").write_bytes(bytes([k + 1, 7, 2 * k + 1, 3]))
        os.utime(cdir / f"e{k}", (1e9 + k, 1e9 + k))
    san.wait([], 1.0, 10)
    assert san.sanitized == 2 and san.errors == 0 and not san.problems
    metas = [json.loads(p.read_text())["meta"] for p in (tmp_path / "work/corpus").glob("*.json")]
    assert sorted(m["extra"]["corpus_file"] for m in metas) == ["e2", "e5"]
    assert all(m["extra"]["sanitizer"]["memcheck"]["status"] != "not-run" for m in metas)


def test_a_sanitizer_error_on_a_corpus_entry_is_a_finding(fake_sanitizer, tmp_path,
                                                          monkeypatch, capsys):
    """The fixed chain finds nothing; memcheck (the stand-in) reports an invalid write in
    every case's gating stage: one finding of that signature, stored like any other with its
    report attached, not handed to the minimiser; exit 1 and the counts in the summary."""
    monkeypatch.setenv("FAKE_ERROR_AT", ",".join(f"{i}:gating" for i in range(64)))
    findings = tmp_path / "findings"
    code = main(["fuzz", "--runs", "40", "--seed", "3", "--findings", str(findings),
                 "--sanitizer-every", "2"])
    text = capsys.readouterr().out
    assert code == 1, text
    store = FindingStore(findings)
    assert [f.signature for f in store.findings()] == [GATING_ERROR]
    assert is_sanitizer_signature(GATING_ERROR) and not is_sanitizer_signature("gating:nan")
    _, meta = corpus.load(store.get(GATING_ERROR).path)
    assert meta.origin == "fuzz" and meta.signature == GATING_ERROR
    rep = meta.extra["sanitizer"]["memcheck"]
    assert rep["errors"] == 1 and rep["reports"][0]["kernel"] == "topk_gating_warp"
    entries = _sanitized_corpus(findings)
    errors = sum(m["extra"]["sanitizer"]["memcheck"]["errors"] for _, m in entries)
    assert entries and errors >= 1  # a case rejected before gating has none
    assert f"memcheck: {len(entries)} case(s) sanitized (1 in 2 new corpus entries, every " \
        f"finding), {errors} sanitizer error(s)" in text
    assert "minimising" not in text and GATING_ERROR in text


def test_missing_sanitizer_is_one_clear_error_before_the_fuzzer_starts(tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr("harness.sanitizer.run._DEFAULT_ROOTS", ())
    findings = tmp_path / "findings"
    assert main(["fuzz", "--runs", "10", "--findings", str(findings),
                 "--sanitizer-every", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compute-sanitizer not found" in err[0]
    assert not findings.exists()  # nothing started


def test_no_gpu_for_the_cuda_backend_and_bad_values(fake_sanitizer, tmp_path, capsys):
    with pytest.raises(ConfigError, match="sanitizer_every"):
        FuzzConfig(sanitizer_every=-1).resolved()
    if torch.cuda.is_available():
        return
    assert main(["fuzz", "--backend", "cuda", "--runs", "10", "--findings",
                 str(tmp_path / "f"), "--sanitizer-every", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]
