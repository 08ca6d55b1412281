"""The fuzz engine end to end on the cpu backend: finds a planted variant from an empty corpus,
stays silent on the fixed chain, resumes from its directories, repeats a run from its seed."""

from __future__ import annotations

import json

import pytest

from harness import corpus
from harness.bugs import VARIANTS
from harness.errors import ConfigError, UnknownVariant
from harness.fuzz.engine import FuzzConfig, fuzz

#: a variant the fuzzer reaches in a few dozen executions (every LoRA slot active)
EASY = "lora-grid-off-by-one"
RUNS = 150


def _config(tmp_path, **kw) -> FuzzConfig:
    kw = {"seconds": None, "runs": RUNS, "seed": 2, "findings_dir": tmp_path / "findings",
          "minimize": False} | kw
    return FuzzConfig(**kw)


def test_finds_a_planted_variant_from_an_empty_corpus(tmp_path):
    seen = []
    report = fuzz(_config(tmp_path, bugs=(EASY,), stop_on_first=True, minimize=True),
                  seen.append)
    assert seen and report.status.reason == "first finding"
    assert report.findings  # one input may violate several checks at once
    for f in report.findings:
        assert f.signature in VARIANTS[EASY].signatures and not f.earlier
        assert f.executions == report.findings[0].executions
    f = report.findings[0]
    assert 0 < f.executions <= RUNS and f.seconds > 0
    case, meta = corpus.load(f.path)
    assert meta.signature == f.signature and meta.extra["executions_to_find"] == f.executions
    assert f.minimized is not None  # minimised after the child stopped
    small, _ = corpus.load(f.minimized)
    assert small.num_tokens <= case.num_tokens
    from harness.api import execute

    assert f.signature in {x.signature for x in execute(small, "cpu", (EASY,)).findings}


def test_fixed_chain_short_run_has_no_findings(tmp_path):
    report = fuzz(_config(tmp_path, runs=100, seed=3))
    s = report.status
    assert report.findings == [] and s.executions == 100
    assert s.coverage > 0 and s.semantic > 0 and s.corpus_size > 0
    assert s.decode_errors == 0 and s.invalid == 0


def test_same_seed_same_run_and_a_rerun_resumes(tmp_path):
    a = fuzz(_config(tmp_path / "a", bugs=(EASY,), runs=50))
    b = fuzz(_config(tmp_path / "b", bugs=(EASY,), runs=50))
    files_a = sorted(p.name for p in a.config.corpus_dir.iterdir())
    files_b = sorted(p.name for p in b.config.corpus_dir.iterdir())
    assert files_a == files_b and files_a
    assert [(f.signature, f.executions) for f in a.findings] == \
        [(f.signature, f.executions) for f in b.findings]

    again = fuzz(_config(tmp_path / "a", bugs=(EASY,), runs=len(files_a) + 5, seed=9))
    log = again.log.read_text()
    assert f"{len(files_a)} files found" in log  # libFuzzer loaded the corpus
    earlier = {f.signature for f in a.findings}
    assert {f.signature for f in again.findings if f.earlier} == earlier
    assert not {f.signature for f in again.new_findings} & earlier  # not found twice


def test_bad_configurations():
    with pytest.raises(ConfigError, match="not both"):
        FuzzConfig(seconds=5, runs=5).resolved()
    with pytest.raises(ConfigError, match="seed"):
        FuzzConfig(seed=0).resolved()
    with pytest.raises(ConfigError, match="graph"):
        FuzzConfig(graph=True).resolved()
    with pytest.raises(UnknownVariant):
        FuzzConfig(bugs=("no-such-bug",)).resolved()
    resolved = FuzzConfig().resolved()
    assert resolved.seed is not None and resolved.corpus_dir == resolved.findings_dir / "corpus"
    assert FuzzConfig.from_json(resolved.to_json()) == resolved


def test_a_stopped_run_keeps_what_it_found(tmp_path):
    """progress() returning True stops the child (SIGTERM), as a killed run would end: the
    corpus and the findings written so far stay, whole, for the next run to resume from."""
    report = fuzz(_config(tmp_path, bugs=(EASY,), runs=None, seconds=120),
                  lambda s: s.executions >= 40)
    s = report.status
    assert s.reason == "stopped" and 40 <= s.executions and s.seconds < 120
    files = list(report.config.corpus_dir.iterdir())
    assert files and all(p.stat().st_size > 0 for p in files)
    for f in report.findings:
        corpus.load(f.path)  # every stored finding is a whole, valid file


def test_semantic_features_reach_libfuzzer(tmp_path):
    """Without Python coverage libFuzzer's only signal is the semantic feature counters: they
    must count (the hook is bound once fuzzing has started, not before)."""
    report = fuzz(_config(tmp_path, runs=60, seed=4, python_coverage=False))
    s = report.status
    assert s.semantic > 0 and s.coverage > 0 and s.corpus_size > 1


def test_two_workers_share_the_corpus_and_store_each_signature_once(tmp_path):
    report = fuzz(_config(tmp_path, bugs=(EASY,), runs=300, workers=2, reload_seconds=1,
                          stats_every=1))
    s = report.status
    assert s.workers == 2 and s.executions == 300 and s.reason == "run budget"
    logs = [(report.run_dir / f"w{i}" / "libfuzzer.log").read_text() for i in range(2)]
    assert all("INITED" in log for log in logs)
    assert any("RELOAD" in log for log in logs)  # one read inputs the other added
    assert report.findings
    for f in report.findings:
        assert len(list(f.path.parent.glob("*.json"))) == 1 and f.run == s.run_id
    samples = [json.loads(line) for line in (report.run_dir / "stats.jsonl").open()]
    assert len(samples) == s.samples >= 2 and samples[-1]["executions"] == 300
    assert any({"parent", "w0", "w1"} <= set(x["rss_mb"]) for x in samples)
