"""Executors: run one case on a backend and return its findings and coverage features.

A sticky CUDA error (an illegal address) poisons the process that hit it, and a kernel that
never returns hangs it, so the cuda backend runs cases in a worker process (`WorkerExecutor`,
over `harness.isolation.Isolated`): the worker answers each case with its outcome, writes the
stage it is in to a shared one-byte file, and is restarted after a sticky error, a death or a
time-out. The input that poisoned, killed or hung it becomes a finding ("<stage>:illegal-access"
as the backend reports it, "<stage>:crash" for a dead worker, "<stage>:hang" for a time-out),
and the caller goes on. The cpu backend cannot poison its process and runs in-process
(`InProcessExecutor`, fast); both have one interface.

Cases cross to the worker as corpus JSON (`harness.corpus`), outcomes come back as JSON.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import mmap
import os
import tempfile
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from harness.backends import resolve_target, target_traits
from harness.bugs import BugSet
from harness.case import MoECase
from harness.chain import STAGES as CHAIN_STAGES
from harness.chain.target import StageHooks, Target
from harness.errors import BackendUnavailable, CaseError, IsolationError
from harness.findings import Finding

#: the stages a worker reports being in ("chain": a whole-chain replay, `Target.run_chain`)
STAGES = (*CHAIN_STAGES, "chain")
FeatureFn = Callable[[object], list[int]]


@dataclass
class Outcome:
    """What one execution produced: findings (one per signature), coverage feature ids,
    whether a stage rejected the input as out of contract, whether the case was invalid,
    whether the worker had to be restarted after it, and for a batch the case of each
    finding and the number of cases checked."""

    findings: list[Finding] = field(default_factory=list)
    features: list[int] = field(default_factory=list)
    rejected: bool = False
    invalid: bool = False
    restarted: bool = False
    #: a batch (`harness.fuzz.batch`): the case of each finding (parallel to `findings`;
    #: empty: the input's own case) and how many checked cases the input ran
    cases: list[MoECase] = field(default_factory=list)
    cases_run: int = 1

    def to_json(self) -> dict:
        return {"findings": [f.to_json() for f in self.findings], "features": self.features,
                "rejected": self.rejected, "invalid": self.invalid}

    @classmethod
    def from_json(cls, obj: dict) -> Outcome:
        findings = [Finding.from_json(f) for f in obj["findings"]]
        return cls(findings, list(obj["features"]), bool(obj["rejected"]),
                   bool(obj["invalid"]))


def _default_features(result: object) -> list[int]:
    from harness.fuzz.features import features

    return features(result)


def run_one(case: MoECase, target: Target, bugs: BugSet,
            features: FeatureFn | None = None) -> Outcome:
    """Execute `case` and turn everything that can happen into an `Outcome`.

    An invalid case is `invalid` (never a finding: the decoder only makes valid ones).
    `BackendUnavailable` propagates (the backend cannot run at all). Any other exception the
    run or its feature extraction raises is a defect of the harness (or of a user's target)
    and becomes the finding "internal:<ExceptionType>" with its location: the loop goes on.
    """
    from harness.api import execute

    try:
        result = execute(case, target, bugs)
        feats = (features or _default_features)(result)
    except CaseError:
        return Outcome(invalid=True)
    except BackendUnavailable:
        raise
    except Exception as exc:  # a defect of the harness: report it, never crash the loop
        kind = type(exc).__name__
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
        return Outcome([Finding("internal", kind, f"{kind}: {exc} (at {where})",
                                case.severity, {"location": where})])
    return Outcome(list(result.findings), list(feats), rejected=result.rejected is not None)


class Executor(ABC):
    """Runs cases on one backend with one variant set; a context manager."""

    @abstractmethod
    def run(self, case: MoECase) -> Outcome: ...

    def run_input(self, data: bytes, limits) -> tuple[MoECase, Outcome]:
        """Decode a fuzz input with the codec `limits` and run it: (case, outcome)."""
        from harness.fuzz import codec

        case = codec.decode(data, limits)
        return case, self.run(case)

    def start(self) -> None:
        """Get ready to run (build the target); `BackendUnavailable` if it cannot."""
        return None

    def close(self) -> None:
        return None

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcessExecutor(Executor):
    """Runs cases in this process: for targets that cannot poison it (the cpu backend)."""

    def __init__(self, target: Target, bugs: BugSet | tuple[str, ...] = (),
                 features: FeatureFn | None = None) -> None:
        self.target = target
        self.bugs = bugs if isinstance(bugs, BugSet) else BugSet.of(bugs)
        self.features = features

    def run(self, case: MoECase) -> Outcome:
        return run_one(case, self.target, self.bugs, self.features)

    def close(self) -> None:
        self.target.close()


# -- the worker process -----------------------------------------------------------------------


class _Tracked(StageHooks):
    """A target that writes the stage it is in (index + 1 into `STAGES`, 0 between stages)
    into a shared byte, so the parent can name the stage of a crash or a hang."""

    def __init__(self, inner: Target, mark: mmap.mmap | None) -> None:
        super().__init__(inner)
        self.mark = mark

    @contextlib.contextmanager
    def around(self, stage: str) -> Iterator[None]:
        if self.mark is not None:
            self.mark[0] = STAGES.index(stage) + 1
        yield
        if self.mark is not None and stage == "chain":
            self.mark[0] = 0

    def usable(self) -> bool:
        """False once the target reports a poisoned context (its `check_usable` raises)."""
        try:
            self.check_usable()
        except BackendUnavailable:
            return False
        return True


#: the worker's targets, built once per worker process: (spec, coverage, graph, mark) -> target
_TARGETS: dict[tuple, _Tracked] = {}


def _worker_target(target: str, device_coverage: bool, graph: bool,
                   stage_file: str | None) -> _Tracked:
    key = (target, device_coverage, graph, stage_file)
    if key not in _TARGETS:
        mark = None
        if stage_file is not None:
            with open(stage_file, "r+b") as f:
                mark = mmap.mmap(f.fileno(), 1)
        _TARGETS[key] = _Tracked(resolve_target(target, graph=graph, coverage=device_coverage),
                                 mark)
    return _TARGETS[key]


def prepare(target: str, device_coverage: bool = True, graph: bool = False,
            stage_file: str | None = None) -> dict:
    """In the worker: build the target (the cuda kernels are built or loaded here, once)."""
    _worker_target(target, device_coverage, graph, stage_file)
    return {"ready": True}


def execute_json(target: str, bugs: list[str], case: dict | None = None,
                 data: str | None = None, limits: dict | None = None,
                 device_coverage: bool = True, graph: bool = False,
                 stage_file: str | None = None) -> dict:
    """In the worker: run one case, given as corpus JSON (`case`) or as fuzz input bytes
    (`data`, base64) decoded with the codec `limits`, and return its `Outcome` as JSON, with
    "dead" true (and a restart requested) when the target is unusable afterwards."""
    from harness import corpus, isolation

    tracked = _worker_target(target, device_coverage, graph, stage_file)
    if tracked.mark is not None:
        tracked.mark[0] = 0
    if data is not None:
        from harness.fuzz import codec

        lim = codec.LIMITS if limits is None else codec.CodecLimits(**limits)
        the_case = codec.decode(base64.b64decode(data), lim)
    else:
        the_case = corpus.case_from_json(case)
    outcome = run_one(the_case, tracked, BugSet.of(bugs))
    dead = not tracked.usable()
    if dead:
        isolation.request_restart()
    return {**outcome.to_json(), "dead": dead}


class WorkerExecutor(Executor):
    """Runs cases in a worker process (`harness.isolation.Isolated`) on the target `target`
    ("cuda", "cpu" or "module:factory"), restarted after a sticky error, a death or `timeout`
    seconds without an answer (`start_timeout` for building the target). `restarts` counts
    the restarts."""

    def __init__(self, target: str, bugs: BugSet | tuple[str, ...] = (), *,
                 device_coverage: bool = True, graph: bool = False, timeout: float = 10.0,
                 start_timeout: float = 900.0) -> None:
        from harness.isolation import Isolated

        if ":" in target:  # fail here, not after starting a worker, for a missing module
            import importlib.util

            module = target.partition(":")[0]
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise BackendUnavailable(f"cannot load target factory '{target}': no module "
                                         f"named '{module}'")
        self.target = target
        self.bugs = bugs if isinstance(bugs, BugSet) else BugSet.of(bugs)
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.restarts = 0
        fd, self._stage_file = tempfile.mkstemp(prefix="moe-harness-stage-")
        os.write(fd, b"\0")
        os.close(fd)
        self._args = {"target": target, "device_coverage": device_coverage, "graph": graph,
                      "stage_file": self._stage_file}
        self._iso = Isolated()
        self._fresh = True

    def _stage(self) -> str:
        try:
            with open(self._stage_file, "rb") as f:
                index = f.read(1)[0] - 1
        except (OSError, IndexError):
            index = -1
        return STAGES[index] if 0 <= index < len(STAGES) else "worker"

    def start(self) -> None:
        if self._fresh:
            self._prepare()

    def _prepare(self) -> None:
        try:
            self._iso.call("harness.fuzz.worker:prepare", self._args, self.start_timeout)
        except IsolationError as exc:
            detail = exc.output.strip().splitlines()[-1:] if exc.kind != "error" else []
            raise BackendUnavailable(f"the worker could not build target '{self.target}': "
                                     f"{exc}" + (f" ({detail[0]})" if detail else "")) from None
        self._fresh = False

    def run(self, case: MoECase) -> Outcome:
        from harness import corpus

        return self._call(case, {"case": corpus.case_to_json(case)})

    def run_input(self, data: bytes, limits) -> tuple[MoECase, Outcome]:
        """The fuzz input's bytes cross to the worker, which decodes them itself (a fraction
        of the cost of the case's JSON, which matters at thousands of runs a second)."""
        from harness.fuzz import codec

        case = codec.decode(data, limits)
        return case, self._call(case, {"data": base64.b64encode(data).decode("ascii"),
                                       "limits": dataclasses.asdict(limits)})

    def _call(self, case: MoECase, payload: dict) -> Outcome:
        if self._fresh:
            self._prepare()
        args = {**self._args, **payload, "bugs": sorted(self.bugs.names)}
        try:
            reply = self._iso.call("harness.fuzz.worker:execute_json", args, self.timeout)
        except IsolationError as exc:
            if exc.kind == "error":  # BackendUnavailable or a defect of the worker itself
                raise BackendUnavailable(f"the worker failed: {exc}") from None
            stage = self._stage()
            self.restarts += 1
            self._fresh = True
            check = "hang" if exc.kind == "timeout" else "crash"
            finding = Finding(stage, check, f"{stage}: {exc}; the worker was restarted",
                              case.severity, {"stage": stage, "output": exc.output[-1000:]})
            return Outcome([finding], restarted=True)
        outcome = Outcome.from_json(reply)
        if reply.get("dead"):
            self.restarts += 1
            self._fresh = True
            outcome.restarted = True
        return outcome

    def close(self) -> None:
        self._iso.close()
        if os.path.exists(self._stage_file):
            os.unlink(self._stage_file)


# -- construction -------------------------------------------------------------------------------


def make_executor(target: str, bugs: BugSet | tuple[str, ...] = (), *,
                  device_coverage: bool = True, graph: bool = False, timeout: float = 10.0,
                  isolate: bool | None = None, features: FeatureFn | None = None) -> Executor:
    """An executor for `target`: a worker process for a target that asks for isolation (cuda,
    a user's target with `isolate = True`) or with `isolate=True`, in-process otherwise
    (`features`: the in-process feature function, default `features.features`)."""
    if isolate is None:
        isolate = target_traits(target)[1]
    if isolate:
        return WorkerExecutor(target, bugs, device_coverage=device_coverage, graph=graph,
                              timeout=timeout)
    return InProcessExecutor(resolve_target(target, graph=graph, coverage=device_coverage),
                             bugs, features)
