"""One worker of a campaign: its fuzzing process (`harness.fuzz.child`), watched and restarted.

libFuzzer ends its process when it stops, and a process can die for reasons of its own (the
rss limit, a crash in native code, a hang), so each worker runs its libFuzzer in a child
process (`python -c _BOOTSTRAP WORKER_DIR`) and supervises it as libFuzzer's fork mode and
ClusterFuzz bots do:

- the child runs in its own process group (its case worker with it) and gets SIGKILL when its
  parent dies (PR_SET_PDEATHSIG, `harness.isolation.die_with_parent`); `stop()` ends the
  whole group: SIGTERM, then SIGKILL;
- the child writes a status file (executions, findings, a heartbeat) atomically; libFuzzer
  its log (appended, one section per start) and the shared corpus directory;
- a child that dies before its budget ends, or whose heartbeat stops for `stall_seconds`, is
  restarted from the corpus (a new seed, the budget that is left), and counted; the input
  libFuzzer names in a crash/timeout/oom artifact is moved out of the corpus first
  (`quarantine/`), so a poisonous input cannot kill every restart. Five deaths in a row
  without a single execution in between end the worker with an error.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness.fuzz.campaign import FuzzConfig, read_json, write_json
from harness.fuzz.store import StoredFinding
from harness.isolation import describe_exit

_BOOTSTRAP = "import sys; from harness.fuzz.child import child_main; child_main(sys.argv[1])"
_LIBFUZZER_LINE = re.compile(rb"cov: (\d+) ft: (\d+) corp: (\d+)/")
#: libFuzzer's words for why it ended, in its log
_CAUSES = (("out-of-memory", "over the rss limit"), ("deadly signal", "a crash"),
           ("ERROR: libFuzzer: timeout", "a hang"), ("Uncaught Python exception",
                                                    "an uncaught Python exception"))
_ARTIFACT = re.compile(r"^(crash|oom|timeout|leak|slow-unit)-([0-9a-f]{40})$")
#: deaths in a row without an execution between them that end a worker
CRASH_LOOP = 5


def _seed_for(seed: int, start: int) -> int:
    """The seed of a worker's `start`-th fuzzing process: its own seed first, then others."""
    return seed if start == 0 else (seed + 7919 * start) % (2**31 - 1) + 1


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker fuzzes: the campaign's config (with this worker's corpus and findings
    directories), its share of the run budget, its seed, the campaign's start time, how often
    libFuzzer re-reads the shared corpus (0: never) and the GPU it is pinned to."""

    index: int
    config: FuzzConfig
    run_id: str
    started_at: float
    runs: int | None
    seed: int
    reload: int = 0
    gpu: int | None = None
    #: torch's CPU threads in the fuzzing process (None: torch's default, one per core)
    threads: int | None = None


@dataclass
class WorkerStatus:
    """A worker's counters, summed over all its fuzzing processes (JSON-ready for Ray)."""

    index: int
    #: the fuzzing process' last status: seconds since the campaign started
    seconds: float = 0.0
    executions: int = 0
    coverage: int = 0
    features: int = 0
    semantic: int = 0
    invalid: int = 0
    decode_errors: int = 0
    restarts: int = 0
    fuzzer_restarts: int = 0
    findings: list[StoredFinding] = field(default_factory=list)
    #: signatures an earlier campaign had found, hit again
    known: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    #: corpus inputs of other workers this one received (Ray; locally libFuzzer reads them)
    synced: int = 0
    done: bool = False
    reason: str = ""
    error: str = ""

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "findings"}
        out["findings"] = [f.to_json() for f in self.findings]
        return out

    @classmethod
    def from_json(cls, obj: dict) -> WorkerStatus:
        obj = dict(obj)
        findings = [StoredFinding.from_json(f) for f in obj.pop("findings")]
        return cls(**obj, findings=findings)


class FuzzWorker:
    """Runs and supervises worker `spec.index`'s fuzzing process in `directory`."""

    def __init__(self, spec: WorkerSpec, directory: Path) -> None:
        self.spec = spec
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.status_path = self.dir / "status.json"
        self.log_path = self.dir / "libfuzzer.log"
        self.status = WorkerStatus(spec.index)
        self._proc: subprocess.Popen | None = None
        self._starts = 0
        self._spawned_at = 0.0
        self._base = WorkerStatus(spec.index)  # what ended processes counted
        self._found: dict[str, StoredFinding] = {}
        self._log_offset = 0
        self._stopping = False
        self._deaths_without_progress = 0
        self._seen_artifacts: set[str] = set()
        self.startup_seconds = 1200.0 if spec.config.backend == "cuda" else 300.0

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # -- the fuzzing process -----------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        # the child imports what we import (a user's target module, a checkout on PYTHONPATH)
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.exists(p))}
        if self.spec.gpu is not None:
            from harness.gpus import pin

            pin(self.spec.gpu, env)
        return env

    def start(self) -> None:
        """Start the first fuzzing process (the next ones start from `poll`)."""
        self._spawn()

    def _spawn(self) -> None:
        spec, c = self.spec, self.spec.config
        runs = None if spec.runs is None else spec.runs - self._base.executions
        seed = _seed_for(spec.seed, self._starts)
        main = threading.current_thread() is threading.main_thread()
        write_json(self.dir / "config.json", {
            "config": replace(c, seed=seed, runs=runs).to_json(), "started_at": spec.started_at,
            "run_id": spec.run_id, "worker": spec.index, "reload": spec.reload,
            "parent_pid": os.getpid(), "pdeathsig": main, "start": self._starts,
            "threads": spec.threads})
        self.status_path.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"=== moe-harness: worker {spec.index}, fuzzing process {self._starts} "
                      f"(seed {seed}) started {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            log.flush()
            self._proc = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, str(self.dir)],
                                          stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=self._env(),
                                          start_new_session=True)
        self._starts += 1
        self._spawned_at = time.monotonic()

    def _kill_group(self, grace: float = 10.0) -> None:
        """SIGTERM the fuzzing process' group (libFuzzer exits cleanly), then SIGKILL."""
        proc = self._proc
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group (a case worker)

    # -- watching ----------------------------------------------------------------------------

    def _read(self) -> dict | None:
        """The current process' status into `self.status` (base + current); its raw dict."""
        obj = read_json(self.status_path)
        s, b = self.status, self._base
        if obj is not None:
            s.seconds = obj["seconds"]
            s.executions = b.executions + obj["executions"]
            s.invalid = b.invalid + obj["invalid"]
            s.decode_errors = b.decode_errors + obj["decode_errors"]
            s.restarts = b.restarts + obj["restarts"]
            s.semantic = max(b.semantic, obj["semantic"])
            for f in obj["findings"]:
                stored = StoredFinding.from_json(f)
                self._found.setdefault(stored.signature, stored)
            s.findings = list(self._found.values())
            s.known = list(dict.fromkeys([*b.known, *obj.get("known", [])]))
        with contextlib.suppress(OSError), open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            chunk = log.read()
            cut = chunk.rfind(b"\n") + 1
            self._log_offset += cut
            for m in _LIBFUZZER_LINE.finditer(chunk[:cut]):
                s.coverage = max(s.coverage, int(m.group(1)))
                s.features = max(s.features, int(m.group(2)))
        s.fuzzer_restarts = self._starts - 1 if self._starts else 0
        return obj

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - chars))
                return f.read().decode("utf-8", "replace")
        return ""

    def _budget_left(self) -> str | None:
        """None while the worker's budget lasts, else the reason it is spent."""
        c = self.spec.config
        if c.seconds is not None and time.time() - self.spec.started_at >= c.seconds:
            return "time budget"
        if self.spec.runs is not None and self.status.executions >= self.spec.runs:
            return "run budget"
        return None

    def poll(self) -> WorkerStatus:
        """Read the fuzzing process' status; restart it if it died or hung. Never blocks long
        (a restart waits for the old process to go)."""
        s = self.status
        if self._proc is None or s.done:
            return s
        obj = self._read()
        rc = self._proc.poll()
        if rc is None:
            if self._stopping:
                return s
            now = time.monotonic()
            if obj is None and now - self._spawned_at > self.startup_seconds:
                self._restart(f"no sign of life {self.startup_seconds:.0f} s after its start")
            elif obj is not None and time.time() - obj["beat"] > self.spec.config.stall_seconds:
                self._restart(f"silent for {self.spec.config.stall_seconds:.0f} s (a hang)")
            return s
        if obj is not None and obj["done"]:
            s.done, s.reason, s.error = True, obj["reason"], obj["error"]
        elif self._stopping:
            s.done, s.reason = True, "stopped"
        elif rc == 0:  # libFuzzer reached its own budget
            s.done, s.reason = True, self._budget_left() or "run budget"
        else:
            self._restart(describe_exit(rc))
        return s

    def _cause(self) -> str:
        tail = self.log_tail(4000)
        for needle, what in _CAUSES:
            if needle in tail:
                return what
        return ""

    def _restart(self, why: str) -> None:
        """Fold the ended process' counters into the base, quarantine the input libFuzzer
        blamed, and start a new process unless the budget is spent or it keeps dying."""
        self._kill_group(grace=2.0)
        obj = self._read()
        s, b = self.status, self._base
        progressed = obj is not None and obj["executions"] > 0
        b.executions, b.invalid, b.decode_errors = s.executions, s.invalid, s.decode_errors
        b.restarts, b.semantic, b.known = s.restarts, s.semantic, list(s.known)
        cause = self._cause()
        quarantined = self._quarantine()
        event = (f"worker {self.spec.index}: fuzzing process {self._starts - 1} "
                 f"{'stopped' if why.startswith(('silent', 'no sign')) else 'died'} ({why}"
                 f"{', ' + cause if cause else ''}) after {s.executions:,} executions")
        if quarantined:
            event += f"; moved {', '.join(quarantined)} out of the corpus"
        self._deaths_without_progress = 0 if progressed else self._deaths_without_progress + 1
        spent = self._budget_left()
        if spent is not None:
            s.events.append(event)
            s.done, s.reason = True, spent
            return
        if self._deaths_without_progress >= CRASH_LOOP:
            s.events.append(event)
            s.done, s.reason = True, "crash loop"
            s.error = (f"worker {self.spec.index}: the fuzzing process died {CRASH_LOOP} times "
                       f"in a row before running an input (last: {why}); log {self.log_path}:"
                       f"\n{self.log_tail()}")
            return
        s.events.append(event + "; restarted from the corpus")
        self._spawn()
        s.fuzzer_restarts = self._starts - 1

    def _quarantine(self) -> list[str]:
        """Move the corpus inputs named by new libFuzzer artifacts (crash-<sha1>, ...: the
        corpus names its files by the same sha1) into `quarantine/`."""
        moved = []
        corpus = self.spec.config.corpus_dir
        for art in sorted(self.dir.iterdir()):
            m = _ARTIFACT.match(art.name)
            if m is None or art.name in self._seen_artifacts:
                continue
            self._seen_artifacts.add(art.name)
            source = corpus / m.group(2)
            if source.is_file():
                (self.dir / "quarantine").mkdir(exist_ok=True)
                with contextlib.suppress(OSError):
                    shutil.move(str(source), self.dir / "quarantine" / m.group(2))
                    moved.append(m.group(2)[:12])
        return moved

    def stop(self, grace: float = 10.0) -> WorkerStatus:
        """Stop the fuzzing process (and its group); the final status."""
        self._stopping = True
        self._kill_group(grace)
        self.poll()
        self.status.done = True
        self.status.reason = self.status.reason or "stopped"
        return self.status

    def rss(self) -> dict[str, float]:
        """RSS (MB) of this worker's processes: "w<i>" (the fuzzing process) and its case
        worker(s)."""
        from harness.fuzz.stats import tree_rss

        pid = self.pid
        if pid is None or self._proc.poll() is not None:
            return {}
        return tree_rss(pid, f"w{self.spec.index}")
