"""Supervision of the fuzzing processes, with real processes: the child dies with its parent,
SIGTERM and SIGINT end a campaign with its summary and the usual exit code, a child that dies
or hangs is restarted from the corpus, a child that cannot start at all ends the campaign."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.fuzz import supervisor
from harness.fuzz.engine import FuzzConfig, fuzz
from harness.fuzz.supervisor import FuzzWorker, WorkerSpec

ROOT = Path(__file__).resolve().parents[1]
#: a variant the fuzzer reaches in a few dozen executions (every LoRA slot active)
EASY = "lora-grid-off-by-one"


def _campaign(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """`moe-harness fuzz ARGS` in a child process, its output in a file."""
    out = tmp_path / "out.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from harness.cli import main; sys.exit(main())",
         "fuzz", "--findings", str(tmp_path / "findings"), "--no-minimize", *args],
        stdout=open(out, "w"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    return proc, out


def _status(findings: Path, worker: int = 0) -> dict | None:
    for path in findings.glob(f".fuzz-run/*/w{worker}/status.json"):
        try:
            return json.loads(path.read_text())
        except ValueError:
            return None
    return None


def _wait(what, timeout: float = 180.0, step: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = what()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def _fuzzing_pid(findings: Path, other_than: int | None = None) -> int:
    """The pid of worker 0's fuzzing process once it runs inputs."""
    def ready():
        s = _status(findings)
        return s["pid"] if s and s["executions"] > 0 and s["pid"] != other_than else None

    return _wait(ready)


def _dead(pid: int) -> bool:
    """Gone, or a zombie (dead, waiting for a reaper that this container may not run)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_the_fuzzing_process_dies_with_its_parent(tmp_path):
    proc, _ = _campaign(tmp_path, "--time", "300")
    try:
        child = _fuzzing_pid(tmp_path / "findings")
        assert not _dead(child)
        proc.kill()  # SIGKILL: no handler, no clean-up in the parent
        proc.wait()
        _wait(lambda: _dead(child), timeout=15)
    finally:
        proc.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_a_clean_campaign_with_its_summary_and_exit_0(tmp_path, sig):
    proc, out = _campaign(tmp_path, "--time", "300", "--stats-every", "1")
    child = _fuzzing_pid(tmp_path / "findings")
    _wait(lambda: " execs " in out.read_text())  # a progress line, without a terminal
    proc.send_signal(sig)
    assert proc.wait(60) == 0
    text = out.read_text()
    assert f"/s, {signal.Signals(sig).name})" in text and "no findings" in text, text
    assert _dead(child)


def test_sigterm_after_a_finding_exits_1_with_the_findings_table(tmp_path):
    proc, out = _campaign(tmp_path, "--time", "300", "--bug", EASY)
    _wait(lambda: "finding lora_align:" in out.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 1
    text = out.read_text()
    assert "findings (" in text and "SIGTERM)" in text, text


def test_a_killed_fuzzing_process_is_restarted_and_the_campaign_goes_on(tmp_path):
    findings = tmp_path / "findings"
    proc, out = _campaign(tmp_path, "--time", "300")
    first = _fuzzing_pid(findings)
    executions = _status(findings)["executions"]
    os.kill(first, signal.SIGKILL)
    second = _fuzzing_pid(findings, other_than=first)  # a new process, fuzzing again
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    text = out.read_text()
    assert "fuzzing process 0 died (killed by signal SIGKILL)" in text, text
    assert "restarted from the corpus" in text and "1 fuzzing process" in text
    total = int(text.split(" executions in ")[0].rsplit("\n", 1)[-1].replace(",", ""))
    assert total >= executions  # the first process' executions still count
    assert _dead(first) and _dead(second)
    log = next(findings.glob(".fuzz-run/*/w0/libfuzzer.log")).read_text()
    assert "fuzzing process 0 " in log and "fuzzing process 1 " in log  # one log, appended


def test_a_hung_fuzzing_process_is_restarted(tmp_path):
    """SIGSTOP freezes the fuzzing process: its heartbeat stops, the worker kills it after
    `stall_seconds` and starts another from the corpus."""
    findings = tmp_path / "findings"
    frozen: list[int] = []

    def progress(status) -> bool:
        s = _status(findings)
        if not frozen and s and s["executions"] > 0:
            frozen.append(s["pid"])
            os.kill(s["pid"], signal.SIGSTOP)
        return status.fuzzer_restarts >= 1 and bool(s) and s["pid"] != frozen[0] \
            and s["executions"] > 0

    report = fuzz(FuzzConfig(seconds=300, seed=5, findings_dir=findings, minimize=False,
                             stall_seconds=4), progress)
    s = report.status
    assert s.reason == "stopped" and s.fuzzer_restarts == 1
    assert "silent for 4 s (a hang)" in s.events[0] and _dead(frozen[0])


def test_a_process_that_never_starts_ends_the_campaign_with_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor, "_BOOTSTRAP", "import sys; sys.exit(3)")
    with pytest.raises(HarnessError, match="died 5 times in a row before running an input"):
        fuzz(FuzzConfig(seconds=300, seed=5, findings_dir=tmp_path / "f", minimize=False))


def test_the_input_libfuzzer_blames_leaves_the_corpus(tmp_path):
    config = FuzzConfig(findings_dir=tmp_path / "f").resolved()
    config.corpus_dir.mkdir(parents=True)
    data = b"poison"
    name = hashlib.sha1(data).hexdigest()
    (config.corpus_dir / name).write_bytes(data)
    (config.corpus_dir / "other").write_bytes(b"fine")
    worker = FuzzWorker(WorkerSpec(0, config, "run", time.time(), None, 1), tmp_path / "w0")
    (worker.dir / f"crash-{name}").write_bytes(data)
    assert worker._quarantine() == [name[:12]]
    assert sorted(p.name for p in config.corpus_dir.iterdir()) == ["other"]
    assert (worker.dir / "quarantine" / name).read_bytes() == data
    assert worker._quarantine() == []  # an artifact is acted on once
