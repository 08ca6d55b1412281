"""Campaigns on the cuda backend (GPU only): two workers sharing one GPU with NVML statistics,
and supervision of the case workers (a killed campaign leaves no process behind)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.fuzz.engine import FuzzConfig, fuzz
from harness.fuzz.stats import children, command_line

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


def test_two_cuda_workers_share_a_gpu_and_report_it(tmp_path):
    report = fuzz(FuzzConfig(backend="cuda", bugs=("topk-nan-argmax",), seconds=120, seed=3,
                             workers=2, gpus="0", stats_every=2, minimize=False,
                             stop_on_first=True, findings_dir=tmp_path / "findings"))
    s = report.status
    assert s.workers == 2 and s.executions > 0 and s.fuzzer_restarts == 0
    assert report.findings and s.reason == "first finding"
    samples = [json.loads(line) for line in (report.run_dir / "stats.jsonl").open()]
    gpu = [x["gpus"]["0"] for x in samples if x.get("gpus", {}).get("0")]
    assert gpu and all(g["mem_total_mb"] > 0 and 0 <= g["util_pct"] <= 100 for g in gpu)
    assert any("w0/case-worker" in x["rss_mb"] and "w1/case-worker" in x["rss_mb"]
               for x in samples)


def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_killed_cuda_campaign_leaves_no_fuzzing_or_case_worker_behind(tmp_path):
    findings = tmp_path / "findings"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main())",
         "fuzz", "--backend", "cuda", "--time", "600", "--findings", str(findings),
         "--no-minimize"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 900  # the kernels may be built first
        family: list[int] = []
        while time.monotonic() < deadline and not family:
            time.sleep(1)
            for status in findings.glob(".fuzz-run/*/w0/status.json"):
                with open(status) as f:
                    s = json.load(f)
                if s["executions"] > 0:
                    kids = [c for c in children(s["pid"])
                            if "harness.isolation" in command_line(c)]
                    family = [s["pid"], *kids] if kids else []
        assert len(family) == 2, "no fuzzing process with a case worker appeared"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        end = time.monotonic() + 20
        while time.monotonic() < end and not all(_dead(p) for p in family):
            time.sleep(0.2)
        assert all(_dead(p) for p in family)
    finally:
        proc.kill()
