"""The fuzz engine: atheris (libFuzzer) over the decoder, the MoE-aware mutators and the chain.

    bytes --codec.decode--> MoECase --executor--> findings + coverage features
      ^                                              |
      +-- libFuzzer (-seed, corpus dir) <-- Python edge coverage + feature counters

A campaign runs `workers` fuzzing processes (`harness.fuzz.child`), each supervised by a
`harness.fuzz.supervisor.FuzzWorker` (restarted from the corpus when it dies or hangs, killed
with its parent), on this host or as Ray actors (`harness.fuzz.cluster`). They share one
corpus directory (libFuzzer re-reads it every `reload_seconds`, as its -jobs mode does) and
one findings directory (a signature is stored once, by whoever finds it first). Each campaign
has its own run directory (`harness.fuzz.rundir`): its configuration, the libFuzzer log and
status of every worker, the statistics (`harness.fuzz.stats`, a sample every `stats_every`
seconds) and its summary, so campaigns sharing the directories never read each other's state.

This parent merges the workers' status, minimises each new finding (in a thread, while the
loop goes on), with `sanitizer_every` replays corpus entries and findings under memcheck
(`harness.fuzz.sanitize`) and builds the `FuzzReport`. SIGTERM and SIGINT stop the campaign
with its report (a second one skips what is left of minimising and sanitizing).

Findings never reach libFuzzer: the test function records them (deduplicated by signature)
and returns, so fuzzing goes on; with `stop_on_first` the campaign ends at the first, or at the
first input whose finding an earlier run on the same findings directory had found (reason
"known finding", the signature in `FuzzStatus.known`): a rerun of the same job stops as soon
as it meets the bug again instead of spending its budget. The variants (`bugs`) are handed to
the executor unread. `seed` makes a one-worker run with
`runs` reproducible; a killed campaign resumes from its corpus and findings directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from harness.errors import BackendUnavailable, HarnessError
from harness.fuzz.campaign import (  # noqa: F401  (the engine's public names, re-exported)
    CPU_LIMITS,
    FEATURE_COUNTERS,
    INSTRUMENTED,
    NOT_INSTRUMENTED,
    RUN_DIR,
    SANITIZE_DIR,
    STATUS_EVERY_S,
    FuzzConfig,
    FuzzReport,
    FuzzStatus,
    codec_limits,
    write_json,
)
from harness.fuzz.store import FindingStore, StoredFinding
from harness.fuzz.supervisor import FuzzWorker, WorkerSpec, WorkerStatus
from harness.paths import output_dir

if TYPE_CHECKING:  # imported where used: the child must not import them uninstrumented
    from pathlib import Path

    from harness.fuzz.rundir import RunDir
    from harness.fuzz.sanitize import BackgroundSanitizer

Progress = Callable[[FuzzStatus], bool | None]
#: seconds between counts of the corpus directory's files
CORPUS_COUNT_EVERY_S = 2.0


class Worker(Protocol):
    """What the engine drives: a local `FuzzWorker` or a Ray actor's handle."""

    log_path: Path

    def start(self) -> None: ...
    def poll(self) -> WorkerStatus: ...
    def stop(self, grace: float = 10.0) -> WorkerStatus: ...
    def rss(self) -> dict[str, float]: ...


class _Minimizer:
    """Minimises new findings one at a time in a background thread, storing the results."""

    def __init__(self, config: FuzzConfig, run_id: str) -> None:
        self.config = config
        self.store = FindingStore(config.findings_dir, config.backend, config.bugs, config.seed,
                                  run=run_id)
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


class _StopSignals:
    """SIGTERM and SIGINT ask the campaign to stop (`received` names the signal); a second
    one raises KeyboardInterrupt (what is left is skipped). Main thread only: elsewhere
    signals cannot be caught and this does nothing."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():  # None: a handler not installed from Python
            signal.signal(sig, signal.SIG_DFL if old is None else old)


def _merge_sanitizer(status: FuzzStatus, sanitizer: BackgroundSanitizer | None) -> None:
    """The sanitizer's counters and findings into `status` (idempotent)."""
    if sanitizer is None:
        return
    status.sanitized, status.sanitizer_errors = sanitizer.sanitized, sanitizer.errors
    status.sanitizer_pending = sanitizer.pending
    own = {f.signature for f in sanitizer.findings}
    status.findings = [f for f in status.findings if f.signature not in own] + \
        list(sanitizer.findings)


def _merge(status: FuzzStatus, states: list[WorkerStatus]) -> None:
    """The workers' counters into `status`: sums, the best worker's coverage, each
    signature once (first found)."""
    status.executions = sum(w.executions for w in states)
    for key in ("invalid", "decode_errors", "restarts", "fuzzer_restarts"):
        setattr(status, key, sum(getattr(w, key) for w in states))
    status.synced_inputs = sum(w.synced for w in states)
    mine = {f.signature for w in states for f in w.findings}
    status.known = list(dict.fromkeys(k for w in states for k in w.known if k not in mine))
    for key in ("coverage", "features", "semantic"):
        setattr(status, key, max(getattr(w, key) for w in states))
    first: dict[str, StoredFinding] = {}
    for w in states:
        for f in w.findings:
            old = first.get(f.signature)
            if old is None or (f.seconds or 0.0) < (old.seconds or 0.0):
                first[f.signature] = f
    status.findings = sorted(first.values(), key=lambda f: f.seconds or 0.0)
    status.events = [e for w in states for e in w.events]


def _write_status(run: RunDir, status: FuzzStatus) -> None:
    """The campaign's status.json: where it stands (rewritten with every sample) and, at the
    end, its findings as they ended (minimised, with the minimised case's severity): one
    truth for whoever reads the run directory afterwards (`moe-harness report`)."""
    s = status
    write_json(run.root / "status.json", {
        "run_id": s.run_id, "seconds": s.seconds, "executions": s.executions,
        "exec_per_s": s.exec_per_s, "coverage": s.coverage, "features": s.features,
        "semantic": s.semantic, "corpus_size": s.corpus_size, "invalid": s.invalid,
        "decode_errors": s.decode_errors, "restarts": s.restarts,
        "fuzzer_restarts": s.fuzzer_restarts, "workers": s.workers,
        "synced_inputs": s.synced_inputs, "findings": [f.to_json() for f in s.findings],
        "known": s.known, "events": s.events, "done": s.done, "reason": s.reason})


def plan_workers(config: FuzzConfig, run_id: str, started_at: float,
                 gpu_list: list[int | None]) -> list[WorkerSpec]:
    """One spec per worker: the run budget shared out, distinct seeds (worker 0 keeps the
    campaign's), GPUs round-robin, the shared corpus re-read when there are several."""
    n = config.workers or (len(gpu_list) if config.gpus else 1)
    reload = config.reload_seconds if n > 1 else 0
    # torch's default pool (a thread per core) in each of n processes oversubscribes the cores
    threads = None
    if n > 1 and config.ray is None and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // n)
    specs = []
    for i in range(n):
        runs = None if config.runs is None else \
            config.runs // n + (1 if i < config.runs % n else 0)
        seed = config.seed if i == 0 else (config.seed + 1000003 * i) % (2**31 - 1) + 1
        specs.append(WorkerSpec(i, config, run_id, started_at, runs, seed, reload,
                                gpu_list[i % len(gpu_list)], threads))
    return [s for s in specs if s.runs is None or s.runs > 0]


def _gpus_of(config: FuzzConfig) -> list[int | None]:
    if config.gpus is None or config.ray is not None:
        return [None]
    from harness.gpus import select_gpus

    return list(select_gpus(config.gpus))


def _usage(config: FuzzConfig, gpu_list: list[int | None],
           workers: list[Worker] = ()) -> dict | None:
    """GPU utilisation and memory on cuda: the GPUs of this host the workers use, or what
    the Ray actors report of theirs."""
    if config.backend != "cuda":
        return None
    if config.ray is not None:
        return {k: v for w in workers for k, v in (getattr(w, "gpus", None) or {}).items()}
    from harness import gpus

    pinned = sorted({g for g in gpu_list if g is not None})
    return gpus.usage(pinned or gpus.visible_candidates() or [0])


def count_inputs(directory: Path) -> int:
    """Files in a corpus directory (scandir: no stat per file, for corpora of 100k inputs)."""
    try:
        with os.scandir(directory) as it:
            return sum(1 for e in it if e.is_file() and not e.name.startswith("."))
    except OSError:
        return 0


def _rss(workers: list[Worker], others: bool = True) -> dict[str, float]:
    """The parent's RSS, each worker's processes, and (`others`) the parent's other children
    (the minimiser's and sanitizer's processes; not with Ray, whose processes are there)."""
    from harness.fuzz.stats import children, command_line, role, rss_mb, tree_rss

    out = {"parent": round(rss_mb(os.getpid()) or 0.0, 1)}
    mine = {getattr(w, "pid", None) for w in workers}
    for w in workers:
        out.update(w.rss())
    for child in children(os.getpid()) if others else ():
        if child not in mine:
            out.update(tree_rss(child, f"parent/{role(command_line(child))}"))
    return out


def fuzz(config: FuzzConfig, progress: Progress | None = None) -> FuzzReport:
    """Run the campaign `config` describes; `progress(status)` is called about 4 times a
    second and may return True to stop it. Raises `ConfigError` for a bad configuration,
    `UnknownVariant` for a bad variant, `SanitizerUnavailable` (before anything starts) when
    `sanitizer_every` is on and memcheck cannot run here, `BackendUnavailable` when the
    backend cannot run and `HarnessError` when a worker keeps dying."""
    from harness.fuzz.rundir import RunDir, running_runs
    from harness.fuzz.sanitize import check_available
    from harness.sanitizer.run import SanitizerConfig

    config = config.resolved()
    if config.sanitizer_every:
        check_available(config.backend, SanitizerConfig())
    gpu_list = _gpus_of(config)
    findings_dir, corpus_dir = config.findings_dir, config.corpus_dir
    output_dir(findings_dir, "findings_dir")
    output_dir(corpus_dir, "corpus_dir")
    earlier = FindingStore(findings_dir, config.backend, config.bugs, config.seed).findings()
    started_ray = False
    if config.ray is not None:  # before the clock starts: a new cluster takes a while
        from harness.fuzz.cluster import connect

        started_ray = connect(config)
    run = RunDir.create(findings_dir)
    started_at = time.time()
    status = FuzzStatus(run_id=run.run_id, earlier_findings=len(earlier),
                        resumed_inputs=count_inputs(corpus_dir))
    others = running_runs(findings_dir, exclude=run.run_id)
    status.concurrent_runs = others
    write_json(run.root / "config.json", {
        **config.to_json(), "run_id": run.run_id, "started_at": started_at, "pid": os.getpid(),
        "resumed_inputs": status.resumed_inputs, "earlier_findings": len(earlier),
        "concurrent_runs": others})
    try:
        specs = plan_workers(config, run.run_id, started_at, gpu_list)
        status.workers = len(specs)
        if config.ray is not None:
            from harness.fuzz.cluster import ray_workers

            workers: list[Worker] = ray_workers(config, specs, run, started_ray)
        else:
            workers = [FuzzWorker(s, run.worker(s.index)) for s in specs]
        return _campaign(config, run, started_at, status, workers, gpu_list, earlier,
                         progress)
    finally:
        run.close()


def _campaign(config: FuzzConfig, run: RunDir, started_at: float, status: FuzzStatus,
              workers: list[Worker], gpu_list: list[int | None],
              earlier: list[StoredFinding], progress: Progress | None) -> FuzzReport:
    """The campaign's loop: start the workers, merge their status, minimise, sanitize and
    sample as it goes; stop them (always); minimise and sanitize what is left; report."""
    from harness.fuzz.sanitize import BackgroundSanitizer, is_sanitizer_signature
    from harness.fuzz.stats import StatsLog

    findings_dir, corpus_dir = config.findings_dir, config.corpus_dir
    minimizer = _Minimizer(config, run.run_id)
    sanitizer = None
    if config.sanitizer_every:  # before the workers start: their corpus files are all new
        sanitizer = BackgroundSanitizer(
            config.sanitizer_every, config.backend, config.bugs,
            FindingStore(findings_dir, config.backend, config.bugs, config.seed, run=run.run_id),
            corpus_dir, run.root / SANITIZE_DIR, codec_limits(config.backend))
    stats = StatsLog(run.stats_path)

    def own(f: StoredFinding) -> bool:  # minimised here: stored by this campaign
        return f.run == run.run_id and not is_sanitizer_signature(f.signature)

    def sample() -> None:
        status.stats = stats.sample(status, _rss(workers, config.ray is None),
                                    _usage(config, gpu_list, workers))
        status.samples += 1
        _write_status(run, status)

    stopped = ""
    error: HarnessError | None = None
    next_sample = time.monotonic() + config.stats_every
    next_count = 0.0
    try:
        with _StopSignals() as signals:
            for w in workers:
                w.start()
            while True:
                time.sleep(STATUS_EVERY_S)
                states = [w.poll() for w in workers]
                _merge(status, states)
                status.seconds = time.time() - started_at
                if time.monotonic() >= next_count:
                    status.corpus_size = count_inputs(corpus_dir)
                    next_count = time.monotonic() + CORPUS_COUNT_EVERY_S
                failed = next((w for w in states if w.error), None)
                if failed is not None:
                    kind = HarnessError if failed.reason == "crash loop" else BackendUnavailable
                    error = kind(failed.error)
                    break
                if config.minimize:
                    for f in status.findings:
                        if own(f):
                            minimizer.submit(f.signature)
                if sanitizer is not None:
                    sanitizer.poll(status.findings, status.seconds, status.executions)
                    _merge_sanitizer(status, sanitizer)
                first = next((w.reason for w in states
                              if w.reason in ("first finding", "known finding")), None)
                if first is not None:  # --stop-on-first: one worker's is the campaign's
                    status.reason = first
                    break
                if all(w.done for w in states):
                    break
                if progress is not None and progress(status):
                    stopped = "stopped"
                    break
                if signals.received:
                    stopped = signals.received
                    break
                if time.monotonic() >= next_sample:
                    sample()
                    next_sample += config.stats_every
    except KeyboardInterrupt:  # a second signal while starting or stopping
        stopped = stopped or "SIGINT"
    finally:
        states = [w.stop() for w in workers]
    _merge(status, states)
    status.corpus_size = count_inputs(corpus_dir)
    status.seconds = max([time.time() - started_at if stopped else 0.0] +
                         [w.seconds for w in states if w.seconds])
    if error is not None:
        stats.close()
        raise error
    status.done = True
    status.reason = status.reason or stopped or \
        next((w.reason for w in states if w.reason), "run budget")
    with _StopSignals():
        try:
            if config.minimize:
                for f in status.findings:
                    if own(f):
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
        except KeyboardInterrupt:
            minimizer.errors.append("interrupted: minimising stopped")
    new = {f.signature: f for f in status.findings}
    for sig, stored in minimizer.done.items():  # the minimised case's severity from now on
        if sig in new:
            new[sig] = replace(new[sig], minimized=stored.minimized, severity=stored.severity)
    status.findings = list(new.values())
    findings = [f for f in earlier if f.signature not in new] + list(new.values())
    sample()
    stats.close()
    if progress is not None:
        progress(status)
    report = FuzzReport(config, status, findings, workers[0].log_path, minimizer.errors,
                        sanitizer.problems if sanitizer is not None else [], run.root)
    with contextlib.suppress(OSError):
        (run.root / "summary.json").write_text(json.dumps(report.to_json(), indent=1))
    return report
