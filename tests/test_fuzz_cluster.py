"""Workers as Ray actors on a local two-CPU Ray cluster: they find a variant, share corpus
inputs through Ray (or a shared directory), and the campaign reports like a local one."""

from __future__ import annotations

import json

import pytest

from harness.bugs import VARIANTS
from harness.fuzz.engine import FuzzConfig, fuzz
from harness.fuzz.store import FindingStore

ray = pytest.importorskip("ray", reason="Ray is an optional extra: moe-harness[ray]")

EASY = "lora-grid-off-by-one"


@pytest.fixture(scope="module")
def local_cluster():
    """One local Ray cluster with 2 CPUs for the module (starting one takes seconds)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(tmp_path, **kw) -> FuzzConfig:
    return FuzzConfig(**{"bugs": (EASY,), "seconds": None, "runs": 300, "seed": 2,
                         "workers": 2, "ray": "auto", "minimize": False,
                         "reload_seconds": 1, "stats_every": 2,
                         "findings_dir": tmp_path / "findings"} | kw)


def test_ray_workers_find_a_variant_and_share_corpus_inputs(local_cluster, tmp_path):
    report = fuzz(_config(tmp_path))
    s = report.status
    assert s.workers == 2 and s.executions == 300 and s.reason == "run budget"
    assert report.findings
    for f in report.findings:
        assert f.signature in VARIANTS[EASY].signatures and f.run == s.run_id
        assert f.path.parent.parent == tmp_path / "findings"  # stored by the driver, once
        assert len(list(f.path.parent.glob("*.json"))) == 1
    assert {f.signature for f in FindingStore(tmp_path / "findings").findings()} == \
        {f.signature for f in report.findings}
    assert s.synced_inputs > 0  # each worker's inputs reached the other
    assert s.corpus_size > 0 and any((tmp_path / "findings" / "corpus").iterdir())
    for i in range(2):  # the logs of the actors' libFuzzers, mirrored into the run directory
        assert "INITED" in (report.run_dir / f"w{i}" / "libfuzzer.log").read_text()
    samples = [json.loads(line) for line in (report.run_dir / "stats.jsonl").open()]
    assert samples and any("w1" in "".join(x["rss_mb"]) for x in samples)
    assert ray.is_initialized()  # a cluster the campaign did not start is left running


def test_ray_workers_can_share_the_corpus_through_a_directory(local_cluster, tmp_path):
    sync = tmp_path / "shared"
    report = fuzz(_config(tmp_path, runs=120, stop_on_first=True, sync_dir=sync))
    assert report.status.reason == "first finding" and report.findings
    assert any((sync / "corpus").iterdir())
    shared = {p.name for p in (sync / "corpus").iterdir()}
    assert shared <= {p.name for p in (tmp_path / "findings" / "corpus").iterdir()}
    assert report.status.synced_inputs == 0  # nothing went through Ray
