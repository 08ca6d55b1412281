"""The fuzz engine: atheris (libFuzzer) over the decoder, the MoE-aware mutators and the chain.

    bytes --codec.decode--> MoECase --executor--> findings + coverage features
      ^                                              |
      +-- libFuzzer (-seed, corpus dir) <-- Python edge coverage + feature counters

libFuzzer ends its process when it stops (`atheris.Fuzz()` never returns), so `fuzz` runs the
loop in a child process (`python -c _BOOTSTRAP RUN_DIR`) and watches it: the child writes a
status file (executions, findings) atomically, libFuzzer its log and its corpus directory (one
byte file per input, its own format), the `FindingStore` one corpus JSON per new signature.
The parent reports progress, minimises each new finding (in a thread, while the loop goes on),
with `sanitizer_every` replays corpus entries and findings under memcheck
(`harness.fuzz.sanitize`, a separate process) and builds the `FuzzReport`. Inside the child
the chain's modules are instrumented by atheris (Python edge coverage) and every run's semantic
features (`features.features`, including the cuda backend's device coverage) bump counters
reserved once with `atheris._reserve_counter()`.

Findings never reach libFuzzer: the test function records them (deduplicated by signature)
and returns, so fuzzing goes on; with `stop_on_first` the child exits after saving the first,
or at the first input whose finding an earlier run on the same findings directory had found
(reason "known finding", the signature in `FuzzStatus.known`): a rerun of the same job stops
as soon as it meets the bug again instead of spending its budget.
The variants (`bugs`) are handed to the executor unread. `seed` makes a run with `runs`
reproducible; a killed run resumes from its corpus and findings directories.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import BackendUnavailable, ConfigError, HarnessError
from harness.fuzz.store import FindingStore, StoredFinding
from harness.paths import check_output_dir, output_dir

if TYPE_CHECKING:  # imported where used: the child must not import them uninstrumented
    from harness.fuzz.sanitize import BackgroundSanitizer

#: counters reserved for semantic features (feature ids are taken modulo this)
FEATURE_COUNTERS = 1 << 13
#: modules whose Python edges libFuzzer sees (the chain, its checks, the decoder)
INSTRUMENTED = ["harness"]
NOT_INSTRUMENTED = ["harness.fuzz.engine", "harness.fuzz.child", "harness.fuzz.store",
                    "harness.fuzz.mutators", "harness.fuzz.minimize", "harness.corpus",
                    "harness.cli", "harness.isolation", "harness.demo"]
RUN_DIR = ".fuzz-run"
#: under RUN_DIR: the sanitizer's decoded corpus entries and its batches (scratch)
SANITIZE_DIR = "sanitize"
#: the codec's work limits on the cpu backend (`codec.CodecLimits` fields). The CPU model's cost
#: grows steeply with T (with the default limits a mutated case took up to 30 s, and cases over
#: 0.5 s took half the time; with these, at most ~1 s: 3x the executions per minute), while
#: every launch threshold stays reachable (grid.y at block_size 1: T * K > 65535)
CPU_LIMITS = {"logits_elements": 2**18, "recv_elements": 2**17, "expert_work": 2**24}
STATUS_EVERY_S = 0.25


@dataclass(frozen=True)
class FuzzConfig:
    """One fuzz run. `seconds` or `runs` bounds it (`seconds` counts from the start of the
    child process); `seed` None picks a fresh one (reported, so any run can be repeated);
    `corpus_dir` None is `<findings_dir>/corpus`. `moe_mutators` off leaves libFuzzer's byte
    mutations alone (ablation); `device_coverage` off hides the cuda backend's counters;
    `python_coverage` off skips atheris' instrumentation. `sanitizer_every` N > 0 replays
    every Nth new corpus entry and every new finding under compute-sanitizer's memcheck in the
    background (0: off). `libfuzzer_args` pass through."""

    backend: str = "cpu"
    bugs: tuple[str, ...] = ()
    seconds: float | None = 60.0
    runs: int | None = None
    corpus_dir: Path | None = None
    findings_dir: Path = Path("findings")
    seed: int | None = None
    stop_on_first: bool = False
    moe_mutators: bool = True
    graph: bool = False
    device_coverage: bool = True
    python_coverage: bool = True
    max_len: int | None = None
    #: every Nth new corpus entry (and every finding) under memcheck; 0: off
    sanitizer_every: int = 0
    minimize: bool = True
    minimize_seconds: float = 30.0
    hang_timeout: float = 10.0
    libfuzzer_args: tuple[str, ...] = ()
    #: cases per fuzz input (`harness.fuzz.batch`, cpu backend): the input's case and
    #: batch - 1 siblings checked as one stack; 1: one case per input
    batch: int = 1

    def resolved(self) -> FuzzConfig:
        """Checked, with the seed and the corpus directory filled in; `ConfigError` for a
        findings or corpus directory that is a file or cannot be made."""
        from harness.bugs import BugSet

        BugSet.of(self.bugs)  # UnknownVariant names a bad variant
        if self.seconds is not None and self.runs is not None:
            raise ConfigError("seconds/runs", "give a time budget or a run budget, not both")
        if self.seconds is not None and not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ConfigError("seconds", f"the time budget must be > 0, got {self.seconds}")
        if self.runs is not None and self.runs < 1:
            raise ConfigError("runs", f"the run budget must be >= 1, got {self.runs}")
        if self.seed is not None and not 1 <= self.seed < 2**31:
            raise ConfigError("seed", f"must be in 1..2**31-1, got {self.seed} (libFuzzer reads "
                                      "0 as 'pick one')")
        if self.max_len is not None and self.max_len < 1:
            raise ConfigError("max_len", f"must be >= 1, got {self.max_len}")
        if self.graph and self.backend != "cuda":
            raise ConfigError("graph", f"CUDA-graph mode needs the cuda backend, not "
                                       f"'{self.backend}'")
        if self.batch < 1:
            raise ConfigError("batch", f"must be >= 1, got {self.batch}")
        if self.batch > 1 and self.backend != "cpu":
            raise ConfigError("batch", f"batched execution runs on the cpu backend, not "
                                       f"'{self.backend}'")
        if self.sanitizer_every < 0:
            raise ConfigError("sanitizer_every", f"must be >= 0, got {self.sanitizer_every}")
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(1, 2**31)
        # a file or an unwritable place given as a directory: one line now, not a traceback
        # after the budget (made by `fuzz`, once nothing else can refuse the run)
        findings = check_output_dir(self.findings_dir, "findings_dir")
        corpus = check_output_dir(self.corpus_dir if self.corpus_dir is not None
                                  else findings / "corpus", "corpus_dir")
        return replace(self, seed=seed, findings_dir=findings, corpus_dir=corpus,
                       bugs=tuple(sorted(set(self.bugs))))

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(corpus_dir=str(self.corpus_dir), findings_dir=str(self.findings_dir),
                   bugs=list(self.bugs), libfuzzer_args=list(self.libfuzzer_args))
        return out

    @classmethod
    def from_json(cls, obj: dict) -> FuzzConfig:
        known = {f.name for f in fields(cls)}
        obj = {k: v for k, v in obj.items() if k in known}
        obj.update(corpus_dir=Path(obj["corpus_dir"]), findings_dir=Path(obj["findings_dir"]),
                   bugs=tuple(obj["bugs"]), libfuzzer_args=tuple(obj["libfuzzer_args"]))
        return cls(**obj)


@dataclass
class FuzzStatus:
    """Where a run stands: what the progress callback sees and the report is built from.

    `coverage` and `features` are libFuzzer's "cov" (edges) and "ft" (features, edges and
    counters by hit-count bucket); `semantic` the distinct semantic feature ids seen."""

    seconds: float = 0.0
    executions: int = 0
    coverage: int = 0
    features: int = 0
    semantic: int = 0
    corpus_size: int = 0
    invalid: int = 0
    decode_errors: int = 0
    restarts: int = 0
    findings: list[StoredFinding] = field(default_factory=list)
    #: signatures hit again that an earlier run on the same findings directory had found
    known: list[str] = field(default_factory=list)
    #: cases replayed under memcheck (`sanitizer_every`), its error reports, cases waiting
    sanitized: int = 0
    sanitizer_errors: int = 0
    sanitizer_pending: int = 0
    done: bool = False
    reason: str = ""

    @property
    def exec_per_s(self) -> float:
        return self.executions / self.seconds if self.seconds > 0 else 0.0


@dataclass
class FuzzReport:
    """The result of `fuzz`: the final status, every finding (this run's and, marked
    `earlier`, those of earlier runs on the same findings directory) and where things are."""

    config: FuzzConfig
    status: FuzzStatus
    findings: list[StoredFinding]
    log: Path
    minimize_errors: list[str] = field(default_factory=list)
    #: what could not be sanitized (`sanitizer_every`), one line each
    sanitizer_problems: list[str] = field(default_factory=list)

    @property
    def new_findings(self) -> list[StoredFinding]:
        return [f for f in self.findings if not f.earlier]

    def to_json(self) -> dict:
        s = self.status
        return {"seed": self.config.seed, "backend": self.config.backend,
                "seconds": s.seconds, "executions": s.executions, "exec_per_s": s.exec_per_s,
                "coverage": s.coverage, "features": s.features, "semantic": s.semantic,
                "corpus_size": s.corpus_size, "restarts": s.restarts, "reason": s.reason,
                "sanitized": s.sanitized, "sanitizer_errors": s.sanitizer_errors,
                "findings": [f.to_json() for f in self.findings], "known": s.known,
                "log": str(self.log)}


Progress = Callable[[FuzzStatus], bool | None]

# -- the parent --------------------------------------------------------------------------------

_LIBFUZZER_LINE = re.compile(rb"cov: (\d+) ft: (\d+) corp: (\d+)/")
_BOOTSTRAP = "import sys; from harness.fuzz.child import child_main; child_main(sys.argv[1])"


def codec_limits(backend: str):
    """The codec limits the engine decodes and mutates with on `backend`."""
    from harness.fuzz.codec import LIMITS

    return replace(LIMITS, **CPU_LIMITS) if backend == "cpu" else LIMITS


def _write_json(path: Path, obj: dict) -> None:
    """Atomic (temp file + rename), without fsync: status files are rewritten often."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class _Watcher:
    """Follows the child's status file and libFuzzer's log."""

    def __init__(self, run_dir: Path, corpus_dir: Path) -> None:
        self.status_path = run_dir / "status.json"
        self.log_path = run_dir / "libfuzzer.log"
        self.corpus_dir = corpus_dir
        self.status = FuzzStatus()
        self.error = ""
        self._log_offset = 0

    def poll(self) -> FuzzStatus:
        obj = _read_json(self.status_path)
        s = self.status
        if obj is not None:
            for key in ("seconds", "executions", "semantic", "invalid", "decode_errors",
                        "restarts", "done", "reason"):
                setattr(s, key, obj[key])
            s.findings = [StoredFinding.from_json(f) for f in obj["findings"]]
            s.known = list(obj.get("known", []))
            self.error = obj["error"]
        with contextlib.suppress(OSError), open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            chunk = log.read()
            cut = chunk.rfind(b"\n") + 1
            self._log_offset += cut
            for m in _LIBFUZZER_LINE.finditer(chunk[:cut]):
                s.coverage, s.features = int(m.group(1)), int(m.group(2))
        with contextlib.suppress(OSError):
            s.corpus_size = sum(1 for p in self.corpus_dir.iterdir() if p.is_file())
        return s

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_bytes()[-chars:].decode("utf-8", "replace")
        return ""


class _Minimizer:
    """Minimises new findings one at a time in a background thread, storing the results."""

    def __init__(self, config: FuzzConfig) -> None:
        self.config = config
        self.store = FindingStore(config.findings_dir, config.backend, config.bugs, config.seed)
        self.done: dict[str, StoredFinding] = {}
        self.errors: list[str] = []
        self._queue: list[str] = []
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._executor = None

    def submit(self, signature: str) -> None:
        with self._lock:
            if signature in self._seen:
                return
            self._seen.add(signature)
            self._queue.append(signature)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, daemon=True,
                                                name="moe-harness-minimize")
                self._thread.start()

    def _work(self) -> None:
        from harness.fuzz.minimize import MinimizeConfig, minimize_finding
        from harness.fuzz.worker import make_executor

        while True:
            with self._lock:
                if not self._queue:
                    return
                signature = self._queue.pop(0)
            try:
                if self._executor is None:
                    c = self.config
                    self._executor = make_executor(c.backend, c.bugs, graph=c.graph,
                                                   timeout=c.hang_timeout,
                                                   features=lambda result: [])
                self.store.reload()
                case = self.store.load_case(signature)
                res = minimize_finding(case, signature, self._executor,
                                       MinimizeConfig(max_seconds=self.config.minimize_seconds))
                stored = self.store.record_minimized(signature, res.case, res.runs,
                                                     res.seconds)
                self.done[signature] = stored
            except Exception as exc:  # a report, never a crash of the run
                self.errors.append(f"minimising {signature}: {type(exc).__name__}: {exc}")

    def join(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        if self._executor is not None and (thread is None or not thread.is_alive()):
            self._executor.close()
            self._executor = None


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (libFuzzer exits gracefully), then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _merge_sanitizer(status: FuzzStatus, sanitizer: BackgroundSanitizer | None) -> None:
    """The sanitizer's counters and findings into `status` (idempotent: the watcher keeps the
    list of the last poll when the status file could not be read)."""
    if sanitizer is None:
        return
    status.sanitized, status.sanitizer_errors = sanitizer.sanitized, sanitizer.errors
    status.sanitizer_pending = sanitizer.pending
    own = {f.signature for f in sanitizer.findings}
    status.findings = [f for f in status.findings if f.signature not in own] + \
        list(sanitizer.findings)


def _final_status(path: Path, status: FuzzStatus) -> None:
    """Rewrite the child's last status with the findings as they ended (minimised, with the
    minimised case's severity): one truth for whoever reads status.json afterwards."""
    obj = _read_json(path)
    if obj is not None:
        obj["findings"] = [f.to_json() for f in status.findings]
        _write_json(path, obj)


def fuzz(config: FuzzConfig, progress: Progress | None = None) -> FuzzReport:
    """Run the fuzzer as `config` says; `progress(status)` is called about 4 times a second
    and may return True to stop the run. Raises `ConfigError` for a bad configuration,
    `UnknownVariant` for a bad variant, `SanitizerUnavailable` (before anything starts) when
    `sanitizer_every` is on and memcheck cannot run here, and `HarnessError` if the fuzzing
    process fails."""
    from harness.fuzz.sanitize import BackgroundSanitizer, check_available, is_sanitizer_signature
    from harness.sanitizer.run import SanitizerConfig

    config = config.resolved()
    if config.sanitizer_every:
        check_available(config.backend, SanitizerConfig())
    findings_dir, corpus_dir = config.findings_dir, config.corpus_dir
    run_dir = findings_dir / RUN_DIR
    output_dir(findings_dir, "findings_dir")
    output_dir(corpus_dir, "corpus_dir")
    output_dir(run_dir, "findings_dir")
    for stale in ("status.json", "libfuzzer.log"):
        (run_dir / stale).unlink(missing_ok=True)
    earlier = FindingStore(findings_dir, config.backend, config.bugs, config.seed).findings()
    _write_json(run_dir / "config.json", {**config.to_json(), "started_at": time.time()})

    watcher = _Watcher(run_dir, corpus_dir)
    minimizer = _Minimizer(config)
    sanitizer = None
    if config.sanitizer_every:  # before the child starts: its corpus files are all new
        sanitizer = BackgroundSanitizer(
            config.sanitizer_every, config.backend, config.bugs,
            FindingStore(findings_dir, config.backend, config.bugs, config.seed), corpus_dir,
            run_dir / SANITIZE_DIR, codec_limits(config.backend))
    # the child imports what we import (a user's target module, a checkout on PYTHONPATH)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.exists(p))}
    # a safety net only: the child ends itself on its budget (kernels may build at first use)
    limit = None if config.seconds is None else \
        config.seconds + 120.0 + (900.0 if config.backend == "cuda" else 0.0)
    start = time.monotonic()
    with open(watcher.log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, str(run_dir)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env)
    stopped = False
    try:
        while proc.poll() is None:
            time.sleep(STATUS_EVERY_S)
            status = watcher.poll()
            if config.minimize:
                for f in status.findings:
                    if not is_sanitizer_signature(f.signature):
                        minimizer.submit(f.signature)
            if sanitizer is not None:
                sanitizer.poll(status.findings, status.seconds, status.executions)
                _merge_sanitizer(status, sanitizer)
            if progress is not None and progress(status) and not stopped:
                stopped = True
                _stop(proc)
            if limit is not None and time.monotonic() - start > limit:
                stopped = True
                _stop(proc)
    except KeyboardInterrupt:  # Ctrl-C: stop the child, report what was found
        stopped = True
    finally:
        _stop(proc)
    status = watcher.poll()
    if watcher.error:
        raise BackendUnavailable(watcher.error)
    if not status.done and not stopped and proc.returncode != 0:
        raise HarnessError(f"the fuzzing process failed (exit code {proc.returncode}); log "
                           f"{watcher.log_path}:\n{watcher.log_tail()}")
    if not status.done:
        status.reason = "stopped" if stopped else "run budget"
    if config.minimize:
        for f in status.findings:
            if not is_sanitizer_signature(f.signature):
                minimizer.submit(f.signature)
    if sanitizer is not None:  # while the minimiser works
        def tick() -> None:
            _merge_sanitizer(status, sanitizer)
            if progress is not None:
                progress(status)

        sanitizer.wait(status.findings, status.seconds, status.executions, tick)
        _merge_sanitizer(status, sanitizer)
    if config.minimize:
        minimizer.join(config.minimize_seconds * max(1, len(status.findings)) + 30)
    new = {f.signature: f for f in status.findings}
    for sig, stored in minimizer.done.items():
        if sig in new:
            new[sig] = replace(new[sig], minimized=stored.minimized, severity=stored.severity)
    status.findings = list(new.values())
    _final_status(watcher.status_path, status)
    findings = [f for f in earlier if f.signature not in new] + list(new.values())
    if progress is not None:
        progress(status)
    return FuzzReport(config, status, findings, watcher.log_path, minimizer.errors,
                      sanitizer.problems if sanitizer is not None else [])
