"""Live statistics: process memory from /proc, GPU usage from (a stand-in for) NVML, the
JSON-lines samples and the progress line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from test_gpus import FakeNVML

from harness import gpus
from harness.fuzz import engine
from harness.fuzz.campaign import FuzzConfig, FuzzStatus
from harness.fuzz.stats import (
    StatsLog,
    command_line,
    process_tree,
    progress_line,
    rss_mb,
    tree_rss,
)
from harness.fuzz.store import StoredFinding


def test_memory_of_a_process_tree_by_role(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        while "time.sleep" not in command_line(sleeper.pid):  # exec'd
            time.sleep(0.05)
        assert sleeper.pid in process_tree(os.getpid())
        rss = tree_rss(os.getpid(), "me")
        assert rss["me"] == round(rss_mb(os.getpid()), 1) > 10
        assert any(k.startswith("me/python") for k in rss)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert rss_mb(sleeper.pid) is None


def test_gpu_usage_and_selection_from_nvml():
    nvml = FakeNVML([5 << 30, 9 << 30, 7 << 30], util=[10, 55, 0])
    assert gpus.usage([1, 2, 7], nvml) == {
        1: {"util_pct": 55.0, "mem_used_mb": 71 * 1024.0, "mem_total_mb": 80 * 1024.0},
        2: {"util_pct": 0.0, "mem_used_mb": 73 * 1024.0, "mem_total_mb": 80 * 1024.0}}
    assert gpus.usage([0], FakeNVML([1], fail_init=True)) is None
    assert gpus.select_gpus("all", nvml) == [1, 2, 0]
    assert gpus.select_gpus("2,0", nvml) == [2, 0]


def test_engine_reports_the_pinned_gpus_on_cuda_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([5 << 30, 9 << 30], util=[20, 80]))
    cuda = FuzzConfig(backend="cuda", gpus="all")
    assert set(engine._usage(cuda, [1])) == {1}
    assert engine._usage(cuda, [None]).keys() == {0}  # unpinned: the default device
    assert engine._usage(FuzzConfig(), [None]) is None
    specs = engine.plan_workers(cuda.resolved(), "r", 0.0, gpus.select_gpus("all"))
    assert [s.gpu for s in specs] == [1, 0] and [s.reload for s in specs] == [10, 10]


def test_plan_shares_the_run_budget_and_keeps_worker_0_on_the_campaign_seed():
    c = FuzzConfig(runs=7, seconds=None, seed=5, workers=3).resolved()
    specs = engine.plan_workers(c, "r", 0.0, [None])
    assert [s.runs for s in specs] == [3, 2, 2] and specs[0].seed == 5
    assert len({s.seed for s in specs}) == 3 and all(s.gpu is None for s in specs)
    one = engine.plan_workers(FuzzConfig(seed=5).resolved(), "r", 0.0, [None])
    assert len(one) == 1 and one[0].reload == 0  # one worker: libFuzzer never re-reads


def test_samples_are_json_lines_with_every_field(tmp_path):
    log = StatsLog(tmp_path / "stats.jsonl")
    s = FuzzStatus(seconds=10.0, executions=100, coverage=7, features=9, semantic=3,
                   corpus_size=4, workers=2, fuzzer_restarts=1)
    log.sample(s, {"parent": 100.0, "w0": 300.0})
    s.seconds, s.executions = 20.0, 400
    s.findings = [StoredFinding("gating:unique-ids", "legal", "", 1.0, 1, tmp_path / "x")]
    log.sample(s, {"parent": 100.0}, {0: {"util_pct": 5.0, "mem_used_mb": 1.0,
                                          "mem_total_mb": 2.0}})
    log.close()
    first, second = [json.loads(line) for line in (tmp_path / "stats.jsonl").open()]
    assert first["exec_per_s"] == 10.0 and first["exec_per_s_recent"] == 10.0
    assert second["exec_per_s_recent"] == 30.0 and second["findings"] == 1
    assert second["gpus"] == {"0": {"util_pct": 5.0, "mem_used_mb": 1.0, "mem_total_mb": 2.0}}
    for key in ("time", "seconds", "executions", "edges", "features", "semantic",
                "corpus_size", "restarts", "fuzzer_restarts", "workers", "rss_mb"):
        assert key in first
    s.stats = second
    line = progress_line(s)
    assert "400 execs" in line and "workers 2" in line and "restarts 0+1" in line
    assert "rss 100 MB" in line and "gpu0 5%" in line
