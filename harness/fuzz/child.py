"""The fuzzing process: libFuzzer (atheris) driving the decoder, the mutators and the chain.

A worker (`harness.fuzz.supervisor.FuzzWorker`) starts it (`python -c _BOOTSTRAP WORKER_DIR`,
its configuration in WORKER_DIR/config.json) and supervises it. Here the chain's modules are
instrumented by atheris (Python edge coverage), every run's semantic features
(`features.features`, the cuda backend's device coverage included) bump counters reserved
once with `atheris._reserve_counter()`, findings go to the `FindingStore` (one corpus JSON
per new signature, stored once across processes) and the status file, with a heartbeat, is
rewritten atomically. The process dies with its parent (PR_SET_PDEATHSIG, and a check of its
parent at every status write). libFuzzer ends this process when it stops: `atheris.Fuzz()`
never returns.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from harness.errors import BackendUnavailable, HarnessError
from harness.fuzz.campaign import (
    FEATURE_COUNTERS,
    INSTRUMENTED,
    NOT_INSTRUMENTED,
    STATUS_EVERY_S,
    FuzzConfig,
    codec_limits,
    write_json,
)
from harness.fuzz.store import FindingStore, StoredFinding


def _fresh_result_probe() -> object:
    """An object whose every rich comparison returns a new object (probes `_trace_cmp`)."""

    class _Probe:
        def _cmp(self, other: object) -> object:
            return _Probe()

        __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _cmp  # type: ignore[assignment]
        __hash__ = object.__hash__

    return _Probe()


def plug_compare_leak(atheris: ModuleType) -> bool:
    """Stop atheris' comparison hook from leaking every comparison's result; True if it did.

    Instrumented code calls `atheris._trace_cmp(left, right, op, counter, is_const)` for every
    `==`, `<`, ...; atheris 3.0 returns the result with one reference too many (a pybind11
    handle made from a new reference), so each tensor comparison of the chain (`ids < 0`,
    `x == x`) kept its result tensor alive forever: 0.5-0.8 MB per execution, gigabytes within
    minutes. A probe (a comparison that returns a fresh object) tells whether the hook in place
    leaks; if it does it is wrapped to drop the extra reference of every non-bool result (a
    leaked reference to True/False costs nothing). An atheris without the bug is left alone.
    libFuzzer swaps in its own hook when fuzzing starts: call this after that (first input).
    """
    native = atheris._trace_cmp
    probe = native(_fresh_result_probe(), _fresh_result_probe(), 2, 0, False)
    # a fresh object held by `probe` and by getrefcount's argument: 2; 3 when one leaked
    if sys.getrefcount(probe) != 3:
        return False
    decref = ctypes.pythonapi.Py_DecRef
    decref.argtypes = [ctypes.py_object]
    decref.restype = None
    decref(probe)

    def trace_cmp(left: object, right: object, op: int, counter: int,
                  is_const: bool) -> object:
        result = native(left, right, op, counter, is_const)
        if result.__class__ is not bool:
            decref(result)
        return result

    atheris._trace_cmp = trace_cmp
    return True


class _Child:
    """The state of the fuzzing process: executor, store, counters, status."""

    def __init__(self, config: FuzzConfig, started_at: float, run_dir: Path,
                 run_id: str | None = None, parent_pid: int | None = None) -> None:
        import atheris

        from harness.fuzz import features, worker

        self.config, self.started_at, self.run_dir = config, started_at, run_dir
        self.parent_pid, self.run_id = parent_pid, run_id
        self.limits = codec_limits(config.backend)
        #: libFuzzer's own hooks are swapped in when fuzzing starts: bound at the first input
        self.trace: Callable[[int], None] | None = None
        self.counters = [atheris._reserve_counter() for _ in range(FEATURE_COUNTERS)]
        self._make_executor = lambda: worker.make_executor(
            config.backend, config.bugs, device_coverage=config.device_coverage,
            graph=config.graph, timeout=config.hang_timeout, features=features.features)
        if config.batch > 1:
            from harness.backends import resolve_target
            from harness.fuzz import batch

            self._make_executor = lambda: batch.BatchExecutor(
                resolve_target(config.backend), config.bugs,
                batch.BatchConfig(size=config.batch, seed=config.seed or 0))
        self.executor = None
        self.store = FindingStore(config.findings_dir, config.backend, config.bugs, config.seed,
                                  run=run_id)
        self.new: list[StoredFinding] = []
        #: signatures found again that an earlier run on the findings directory had found
        self.known: list[str] = []
        self.semantic: set[int] = set()
        self.executions = self.invalid = self.decode_errors = 0
        self._last_status = 0.0

    def open(self) -> None:
        """Make and start the executor (the cuda kernels are built or loaded here)."""
        self.executor = self._make_executor()
        self.executor.start()

    def elapsed(self) -> float:
        return time.time() - self.started_at

    def write_status(self, done: bool = False, reason: str = "", error: str = "") -> None:
        status = {"seconds": self.elapsed(), "executions": self.executions,
                  "semantic": len(self.semantic), "invalid": self.invalid,
                  "decode_errors": self.decode_errors,
                  "restarts": getattr(self.executor, "restarts", 0),
                  "findings": [f.to_json() for f in self.new], "known": self.known,
                  "done": done, "reason": reason, "error": error, "beat": time.time(),
                  "pid": os.getpid()}
        write_json(self.run_dir / "status.json", status)
        self._last_status = time.monotonic()
        if not done and self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.finish("parent gone")  # a parent that could not use PR_SET_PDEATHSIG

    def finish(self, reason: str, error: str = "") -> None:
        self.write_status(done=True, reason=reason, error=error)
        if self.executor is not None:
            with contextlib.suppress(Exception):
                self.executor.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def _this_campaigns(self, signature: str) -> bool:
        """Whether this campaign stored `signature` (this worker before a restart, or
        another of its workers): not a finding of an earlier run."""
        stored = self.store.get(signature)
        return stored is not None and stored.run is not None and stored.run == self.run_id

    def test_one_input(self, data: bytes) -> None:
        """libFuzzer's target: decode, run, feed features, record findings; never raises."""
        if self.trace is None:  # the first input: libFuzzer's hooks are in place now
            import atheris

            plug_compare_leak(atheris)
            self.trace = atheris._trace_branch
        self.executions += 1
        try:
            case, outcome = self.executor.run_input(data, self.limits)
        except BackendUnavailable as exc:  # the backend cannot run at all
            self.finish("error", str(exc))
        except Exception:  # the decoder is total by contract: count a breach, go on
            self.decode_errors += 1
            return
        self.executions += outcome.cases_run - 1  # a batch: every case checked counts
        if outcome.invalid:
            self.invalid += 1
        counters, trace = self.counters, self.trace
        for f in outcome.features:
            trace(counters[f % FEATURE_COUNTERS])
        self.semantic.update(outcome.features)
        found = False
        for i, finding in enumerate(outcome.findings):
            shown_by = outcome.cases[i] if outcome.cases else case  # a batch's own case
            try:
                stored = self.store.record(shown_by, finding, self.elapsed(), self.executions)
            except (HarnessError, OSError) as exc:  # a finding that cannot be kept: say so
                self.finish("error", f"cannot save the finding {finding.signature}: {exc}")
            if stored is not None:
                self.new.append(stored)
                found = True
            elif finding.signature not in self.known and \
                    all(f.signature != finding.signature for f in self.new) and \
                    not self._this_campaigns(finding.signature):
                self.known.append(finding.signature)
        c = self.config
        if found and c.stop_on_first:
            self.finish("first finding")
        if self.known and c.stop_on_first:  # found before, by an earlier run: say so, stop
            self.finish("known finding")
        if c.seconds is not None and self.elapsed() >= c.seconds:
            self.finish("time budget")
        if c.runs is not None and self.executions >= c.runs:
            self.finish("run budget")
        if found or time.monotonic() - self._last_status > STATUS_EVERY_S:
            self.write_status()


def _libfuzzer_argv(config: FuzzConfig, run_dir: Path, reload: int = 0,
                    seconds_left: float | None = None) -> list[str]:
    """libFuzzer's flags: `reload` > 0 re-reads the shared corpus every so many seconds (other
    workers' inputs); its own time limit is a safety net behind the child's budget check."""
    # libFuzzer's own per-input timeout stays behind the supervisor's stall detection
    argv = ["moe-harness-fuzz", f"-seed={config.seed}", f"-reload={reload}",
            f"-timeout={max(60, math.ceil(config.stall_seconds * 2))}",
            f"-rss_limit_mb={config.rss_limit_mb}", "-print_final_stats=1",
            f"-artifact_prefix={run_dir}/"]
    if config.runs is not None:
        argv.append(f"-runs={config.runs}")
    if config.seconds is not None:
        left = config.seconds if seconds_left is None else seconds_left
        argv.append(f"-max_total_time={max(1, math.ceil(left)) + 5}")
    if config.max_len is not None:
        argv.append(f"-max_len={config.max_len}")
    return [*argv, *config.libfuzzer_args, str(config.corpus_dir)]


def child_main(run_dir: str) -> None:
    """Entry point of the fuzzing process (a worker starts it): never returns."""
    run = Path(run_dir)
    obj = json.loads((run / "config.json").read_text())
    parent = obj["parent_pid"]
    if obj["pdeathsig"]:
        from harness.isolation import die_with_parent

        die_with_parent(parent)
    config = FuzzConfig.from_json(obj["config"])
    if obj.get("threads"):  # several workers share the cores: one torch thread pool each
        import torch

        torch.set_num_threads(obj["threads"])
    import atheris

    if config.python_coverage:
        with atheris.instrument_imports(include=INSTRUMENTED, exclude=NOT_INSTRUMENTED):
            import harness.api
            import harness.backends.cpu
            import harness.fuzz.codec
            import harness.fuzz.features
            import harness.fuzz.worker
            import harness.invariants
            import harness.oracle  # noqa: F401
    child = _Child(config, obj["started_at"], run, obj["run_id"], parent)
    try:
        child.open()
    except HarnessError as exc:
        child.finish("error", str(exc))
    from harness.fuzz import mutators

    # moe_mutators off: byte-level mutation only (libFuzzer's own, through atheris.Mutate)
    mcfg = mutators.MutatorConfig(enabled=config.moe_mutators, libfuzzer_bytes=True,
                                  limits=child.limits)

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        return mutators.mutate(data, max_size, seed, mcfg)

    def custom_crossover(data1: bytes, data2: bytes, max_size: int, seed: int) -> bytes:
        return mutators.crossover(data1, data2, max_size, seed, mcfg)

    child.write_status()
    left = None if config.seconds is None else config.seconds - child.elapsed()
    atheris.Setup(_libfuzzer_argv(config, run, obj["reload"], left), child.test_one_input,
                  custom_mutator=custom_mutator, custom_crossover=custom_crossover)
    atheris.Fuzz()
    child.finish("run budget")  # not reached: libFuzzer exits the process
