"""Campaigns side by side: each its own locked run directory; campaigns sharing a corpus and a
findings directory each report only their own run; a resumed campaign says what it resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.fuzz.campaign import RUN_DIR
from harness.fuzz.rundir import RunDir, is_running, running_runs
from harness.fuzz.store import FindingStore

ROOT = Path(__file__).resolve().parents[1]
EASY = "lora-grid-off-by-one"


def test_a_run_directory_is_locked_while_its_campaign_runs(tmp_path):
    a = RunDir.create(tmp_path, "a")
    b = RunDir.create(tmp_path, "b")
    assert a.root == tmp_path / RUN_DIR / "a" and a.worker(3) == a.root / "w3"
    assert is_running(a.root) and running_runs(tmp_path) == ["a", "b"]
    assert running_runs(tmp_path, exclude="a") == ["b"]
    a.close()
    assert not is_running(a.root) and running_runs(tmp_path) == ["b"]
    with pytest.raises(HarnessError, match="exists"):
        RunDir.create(tmp_path, "b")
    b.close()


def _cli(tmp_path: Path, name: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main())",
         "fuzz", "--findings", str(tmp_path / "findings"), "--corpus", str(tmp_path / "corpus"),
         "--no-minimize", "--seed", "3", *args],
        stdout=open(tmp_path / f"{name}.txt", "w"), stderr=subprocess.STDOUT, env=env)


def test_campaigns_sharing_directories_report_only_their_own_run(tmp_path):
    """A fixed-chain campaign beside one that finds a variant, on the same corpus and findings
    directories: the fixed chain exits 0 with no findings and coverage of its own."""
    buggy = _cli(tmp_path, "buggy", "--bug", EASY, "--time", "60", "--stop-on-first")
    fixed = _cli(tmp_path, "fixed", "--runs", "60")
    assert buggy.wait(300) == 1 and fixed.wait(300) == 0
    b_text = (tmp_path / "buggy.txt").read_text()
    f_text = (tmp_path / "fixed.txt").read_text()
    assert "finding lora_align:" in b_text
    assert "no findings" in f_text and "finding " not in f_text and "coverage 0 edges" not in \
        f_text, f_text
    runs = sorted((tmp_path / "findings" / RUN_DIR).iterdir())
    assert len(runs) == 2
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    assert sorted(len(s["findings"]) > 0 for s in summaries) == [False, True]
    for r, s in zip(runs, summaries, strict=True):
        assert s["run_id"] == r.name and (r / "w0" / "libfuzzer.log").stat().st_size > 0
        assert not is_running(r)
    stored = FindingStore(tmp_path / "findings").findings()
    assert stored and {f.run for f in stored} == {next(s["run_id"] for s in summaries
                                                      if s["findings"])}


def test_a_resumed_campaign_says_so(tmp_path, capsys):
    from harness.cli import main

    args = ["fuzz", "--findings", str(tmp_path), "--no-minimize", "--bug", EASY, "--seed", "2",
            "--stop-on-first", "--runs", "150"]
    assert main(args) == 1
    first = capsys.readouterr().out
    assert "resumed:" not in first
    inputs = sum(1 for _ in (tmp_path / "corpus").iterdir())
    earlier = len(FindingStore(tmp_path).findings())
    assert main([*args[:-1], "20"]) == 1  # earlier findings: exit 1, as before
    again = capsys.readouterr().out
    assert f"resumed: {inputs} corpus inputs, {earlier} earlier findings" in again, again
