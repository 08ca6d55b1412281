"""Gating a pull request: replay the corpus, then fuzz what changed, within one time budget.

Modelled on ClusterFuzzLite's code-change mode:

    1. replay   every case of the corpus directories against the expectations stored with it
                (`harness.corpus.expect`, as the pytest plugin does); a failed expectation
                fails the gate and fuzzing is skipped (there is something to fix already)
    2. focus    with `since`, the stages whose files changed (`harness.changes`); else all
    3. fuzz     the rest of the budget, split over the focus stages (a segment each, merged
                when the budget is short), each seeded with the corpus cases that cover that
                stage's branches (`harness.fuzz.merge.cover` over the stage's features);
                stop at the first finding (a new one, or one an earlier run had found)
    4. keep     each finding's minimised reproducer as a corpus file ready to commit (the
                fixed chain expected clean: it fails until the bug is fixed)

The result (`GateResult`) carries everything the reports need (`harness.report`: JUnit, SARIF,
Markdown); `exit_code` is 0 clean, 1 a finding or a failed expectation.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from harness.changes import STAGES, changed_files, changed_stages
from harness.errors import ConfigError, HarnessError
from harness.paths import output_dir

#: below this many seconds left for fuzzing, the fuzz step is skipped (a child's start-up alone
#: takes several seconds)
MIN_FUZZ_S = 8.0
#: under the findings directory: the libFuzzer byte corpora of the segments, and the findings
#: as corpus files ready to commit
WORK_DIR = ".gate"
READY_DIR = "corpus-ready"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class GateConfig:
    """One gate run. `seconds` bounds the whole run (replay included); `since` a git ref whose
    merge base with HEAD the changed files are taken from (None: every stage); `target` "cpu",
    "cuda" or "module:attr"; `bugs` switches variants on (to show what the gate catches)."""

    target: str = "cpu"
    seconds: float = 600.0
    since: str | None = None
    corpus_dirs: tuple[Path, ...] = ()
    findings_dir: Path = Path("findings")
    bugs: tuple[str, ...] = ()
    seed: int | None = None
    repo: Path = Path(".")
    case_timeout: float = 300.0
    min_segment_s: float = 20.0
    minimize_seconds: float = 30.0

    def resolved(self) -> GateConfig:
        from harness.bugs import BugSet

        BugSet.of(self.bugs)
        if not (math.isfinite(self.seconds) and self.seconds > 0):
            raise ConfigError("--time", f"the time budget must be > 0, got {self.seconds}")
        for d in self.corpus_dirs:
            if not Path(d).exists():
                raise ConfigError("--corpus", f"{d}: no such corpus directory")
        findings = output_dir(self.findings_dir, "--findings")
        return replace(self, findings_dir=findings, bugs=tuple(sorted(set(self.bugs))),
                       corpus_dirs=tuple(Path(d) for d in self.corpus_dirs))


@dataclass
class CorpusCase:
    """One corpus file replayed: its checks' results, or why it could not be."""

    path: Path
    results: list = field(default_factory=list)  # corpus.expect.CheckResult
    error: str | None = None
    report: str = ""  # corpus.explain: what failed, the rows beside the oracle's, the command
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and all(r.ok for r in self.results)


@dataclass
class GateFinding:
    """Something that fails the gate. `kind`: "finding" (the fuzzer's or a corpus case's
    unexpected finding), "expectation" (a corpus case's expected finding did not come),
    "error" (a corpus file that cannot be read or run). `reproducer` is the minimised case
    where there is one; `command` the `moe-harness run ...` line that shows it."""

    kind: str
    signature: str
    stage: str
    severity: str
    message: str
    reproducer: Path
    command: str
    bugs: tuple[str, ...] = ()
    origin: str = "fuzz"  # "fuzz" or "corpus"
    first_input: Path | None = None
    ready: Path | None = None  # the corpus file ready to commit
    known: bool = False  # found by an earlier run on the findings directory
    seconds: float | None = None
    executions: int | None = None

    def to_json(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in self.__dict__.items()}


@dataclass
class Segment:
    """One fuzz run of the gate, focused on `stages` by its seeds."""

    stages: tuple[str, ...]
    budget: float
    seeds: int = 0
    seconds: float = 0.0
    executions: int = 0
    coverage: int = 0
    features: int = 0
    reason: str = "not run"
    log: Path | None = None
    #: signatures it stopped at
    found: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "+".join(self.stages) if self.stages != STAGES else "all stages"

    def to_json(self) -> dict:
        return {**{k: v for k, v in self.__dict__.items() if k != "log"}, "name": self.name,
                "stages": list(self.stages), "log": None if self.log is None else str(self.log)}


@dataclass
class GateResult:
    config: GateConfig
    corpus: list[CorpusCase] = field(default_factory=list)
    focus: tuple[str, ...] = ()
    changed: list[str] | None = None  # the files changed since `since` (None: not asked)
    segments: list[Segment] = field(default_factory=list)
    findings: list[GateFinding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def corpus_failed(self) -> list[CorpusCase]:
        return [c for c in self.corpus if not c.ok]

    @property
    def exit_code(self) -> int:
        return 1 if self.findings or self.corpus_failed else 0

    def to_json(self) -> dict:
        c = self.config
        return {"target": c.target, "bugs": list(c.bugs), "since": c.since,
                "budget_s": c.seconds, "seconds": self.seconds, "exit_code": self.exit_code,
                "corpus": {"cases": len(self.corpus), "failed": [
                    {"path": str(x.path), "error": x.error, "report": x.report}
                    for x in self.corpus_failed]},
                "changed_files": self.changed, "focus": list(self.focus),
                "segments": [s.to_json() for s in self.segments],
                "findings": [f.to_json() for f in self.findings], "notes": self.notes}


# -- 1. replay ---------------------------------------------------------------------------------


def _corpus_files(dirs: tuple[Path, ...]) -> list[Path]:
    from harness import corpus

    return [p for d in dirs for p in corpus.iter_corpus(d)]


def replay_corpus(config: GateConfig, progress: Progress | None = None) -> list[CorpusCase]:
    """Every corpus file against its stored expectations on the target (a child process for
    targets that ask for isolation: cuda; a crash or a hang fails that case only)."""
    from harness import corpus
    from harness.backends import resolve_target, target_traits
    from harness.corpus import expect, explain

    files = _corpus_files(config.corpus_dirs)
    if not files:
        return []
    name, isolate = target_traits(config.target)
    runner = target = None
    if isolate:
        from harness.isolation import Isolated

        runner = Isolated(setup=[("harness.corpus.expect:prepare_target",
                                  {"target": config.target})])
    else:
        target = resolve_target(config.target)
    out: list[CorpusCase] = []
    try:
        for i, path in enumerate(files):
            if progress is not None:
                progress(f"replaying {i + 1}/{len(files)}: {path}")
            start = time.perf_counter()
            try:
                case, meta = corpus.load(path)
                checks = expect.checks_for(meta, name, config.bugs or None)
                results = (expect.run_checks_in(runner, str(path), config.target, checks,
                                                config.case_timeout) if runner is not None
                           else expect.run_checks(case, target, checks))
            except HarnessError as exc:
                out.append(CorpusCase(path, error=str(exc),
                                      seconds=time.perf_counter() - start))
                continue
            cc = CorpusCase(path, results, seconds=time.perf_counter() - start)
            if not cc.ok:
                cc.report = explain.explain(str(path), config.target, case, results)
            out.append(cc)
    finally:
        if runner is not None:
            runner.close()
        if target is not None:
            target.close()
    return out


def corpus_findings(config: GateConfig, cases: list[CorpusCase]) -> list[GateFinding]:
    """What each failed corpus case contributes to the gate's findings."""
    from harness.corpus.explain import reproduce_command

    out: list[GateFinding] = []
    for c in cases:
        if c.error is not None:
            out.append(GateFinding("error", "corpus:unreadable", "corpus", "legal", c.error,
                                   c.path, f"moe-harness corpus check {c.path}",
                                   origin="corpus"))
            continue
        for r in c.results:
            if r.ok:
                continue
            cmd = reproduce_command(str(c.path), config.target, r.check.bugs)
            if r.error is not None or not r.findings:
                what = r.error or f"expected {r.check.outcome} {r.check.label}, got {r.got()}"
                out.append(GateFinding("expectation", r.check.outcome, r.check.outcome
                                       .split(":")[0] if ":" in r.check.outcome else "corpus",
                                       "legal", what, c.path, cmd, r.check.bugs, "corpus"))
                continue
            for f in r.findings:
                if f.signature != r.check.outcome:
                    out.append(GateFinding("finding", f.signature, f.stage, f.severity,
                                           f.message, c.path, cmd, r.check.bugs, "corpus"))
    return out


# -- 2-3. focus and fuzz -----------------------------------------------------------------------


def plan_segments(focus: tuple[str, ...], budget: float, min_segment_s: float
                  ) -> list[tuple[str, ...]]:
    """The focus stages grouped into segments of at least `min_segment_s` seconds each
    (round robin: with a short budget, several stages share a segment)."""
    if not focus:
        return []
    n = max(1, min(len(focus), int(budget // max(min_segment_s, 1e-9))))
    groups: list[list[str]] = [[] for _ in range(n)]
    for i, stage in enumerate(focus):
        groups[i % n].append(stage)
    return [tuple(s for s in STAGES if s in g) for g in groups]


def seed_inputs(profiles: list, stages: tuple[str, ...], directory: Path, target: str) -> int:
    """Write, as libFuzzer inputs under `directory`, the corpus cases that cover the branches
    of `stages` (greedy cover of their "cov.<stage>.*" features; every case when none reaches
    them). Until `fuzz --corpus` seeds from JSON itself, this is the gate's way in."""
    from harness.fuzz import codec
    from harness.fuzz.engine import codec_limits
    from harness.fuzz.merge import cover

    def key(p):
        return frozenset().union(*(p.stage_features.get(s, frozenset()) for s in stages))

    relevant = [p for p in profiles if key(p)]
    chosen = cover(relevant, key=key) if relevant else list(profiles)
    limits = codec_limits(target)
    directory.mkdir(parents=True, exist_ok=True)
    for p in chosen:
        data = codec.encode(p.case, strict=False, limits=limits)
        (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)
    return len(chosen)


def _fuzz_findings(config: GateConfig, report) -> list[GateFinding]:
    """The findings a fuzz segment stopped at: new ones, and known ones it met again."""
    from harness.corpus.explain import reproduce_command

    hits = [f for f in report.findings if not f.earlier or f.signature in report.status.known]
    out = []
    for f in hits:
        repro = f.minimized or f.path
        out.append(GateFinding("finding", f.signature, f.signature.split(":", 1)[0],
                               f.severity, f.message, repro,
                               reproduce_command(str(repro), config.target, config.bugs),
                               config.bugs, "fuzz", first_input=f.path, known=f.earlier,
                               seconds=f.seconds, executions=f.executions))
    return out


def ready_to_commit(finding: GateFinding, directory: Path) -> Path:
    """The finding's reproducer as a corpus regression under `directory` (fixed chain expected
    clean, its variant expectations kept: `corpus.promote.promoted_meta`)."""
    from harness import corpus
    from harness.corpus.promote import KINDS, promoted_meta

    case, meta = corpus.load(finding.reproducer)
    return corpus.save(case, directory / KINDS["regression"],
                       promoted_meta(meta, "regression", finding.reproducer.name))


def run_gate(config: GateConfig, progress: Progress | None = None) -> GateResult:
    """Run the gate as `config` says (see the module docstring). Raises `ConfigError` for a
    bad configuration or `--since` ref, `HarnessError` if the fuzzer cannot run."""
    from harness.fuzz.engine import FuzzConfig, fuzz
    from harness.fuzz.merge import profile_all

    say = progress or (lambda line: None)
    config = config.resolved()
    start = time.monotonic()
    result = GateResult(config)
    if config.since is not None:
        result.changed = changed_files(config.since, config.repo)
        result.focus = changed_stages(result.changed)
    else:
        result.focus = STAGES
    result.corpus = replay_corpus(config, say)
    result.findings += corpus_findings(config, result.corpus)
    left = config.seconds - (time.monotonic() - start)
    if result.corpus_failed:
        result.notes.append(f"fuzzing skipped: {len(result.corpus_failed)} corpus case(s) "
                            "failed their expectations")
    elif not result.focus:
        result.notes.append(f"fuzzing skipped: no file of a chain stage changed since "
                            f"{config.since} ({len(result.changed or [])} file(s) changed)")
    elif left < MIN_FUZZ_S:
        result.notes.append(f"fuzzing skipped: {left:.0f} s of the {config.seconds:.0f} s "
                            "budget left after the corpus replay")
    else:
        say("profiling the corpus on the cpu backend (seeds per stage)")
        profiles, problems = profile_all(_corpus_files(config.corpus_dirs))
        result.notes += [f"not a seed: {p}: {why}" for p, why in problems.items()]
        work = config.findings_dir / WORK_DIR
        shutil.rmtree(work, ignore_errors=True)
        left = config.seconds - (time.monotonic() - start)
        plan = plan_segments(result.focus, left, config.min_segment_s)
        result.segments = [Segment(stages, 0.0) for stages in plan]
        for i, seg in enumerate(result.segments):
            left = config.seconds - (time.monotonic() - start)
            seg.budget = left / (len(plan) - i)
            if seg.budget < MIN_FUZZ_S:
                seg.reason = "no time left"
                continue
            seg_dir = work / seg.name.replace(" ", "-")
            seg.seeds = seed_inputs(profiles, seg.stages, seg_dir, config.target)
            say(f"fuzzing {seg.name} for {seg.budget:.0f} s from {seg.seeds} seed(s)")
            report = fuzz(FuzzConfig(
                backend=config.target, bugs=config.bugs, seconds=seg.budget,
                corpus_dir=seg_dir, findings_dir=config.findings_dir,
                seed=None if config.seed is None else config.seed + i, stop_on_first=True,
                minimize_seconds=config.minimize_seconds))
            s = report.status
            seg.seconds, seg.executions, seg.reason = s.seconds, s.executions, s.reason
            seg.coverage, seg.features, seg.log = s.coverage, s.features, report.log
            result.notes += [f"{seg.name}: {p}" for p in report.minimize_errors]
            found = _fuzz_findings(config, report)
            if found:
                seg.found = [f.signature for f in found]
                result.findings += found
                break
    ready = config.findings_dir / READY_DIR
    for f in result.findings:
        if f.origin == "fuzz":
            try:
                f.ready = ready_to_commit(f, ready)
            except HarnessError as exc:
                result.notes.append(f"{f.signature}: not written as a corpus file: {exc}")
    result.seconds = time.monotonic() - start
    return result
