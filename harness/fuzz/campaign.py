"""What a fuzz campaign is: its configuration (`FuzzConfig`), where it stands (`FuzzStatus`)
and what it produced (`FuzzReport`), plus the few constants the parent and the fuzzing
processes share. Nothing here starts a process: `harness.fuzz.engine.fuzz` does.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from harness.errors import ConfigError
from harness.fuzz.store import StoredFinding

#: counters reserved for semantic features (feature ids are taken modulo this)
FEATURE_COUNTERS = 1 << 13
#: modules whose Python edges libFuzzer sees (the chain, its checks, the decoder)
INSTRUMENTED = ["harness"]
NOT_INSTRUMENTED = ["harness.fuzz.engine", "harness.fuzz.child", "harness.fuzz.store",
                    "harness.fuzz.mutators", "harness.fuzz.minimize", "harness.fuzz.campaign",
                    "harness.fuzz.supervisor", "harness.fuzz.rundir", "harness.fuzz.stats",
                    "harness.fuzz.cluster", "harness.corpus", "harness.cli",
                    "harness.isolation", "harness.demo", "harness.gpus"]
#: under the findings directory: one directory per campaign (`harness.fuzz.rundir`)
RUN_DIR = ".fuzz-run"
#: under a campaign's directory: the sanitizer's decoded corpus entries and batches (scratch)
SANITIZE_DIR = "sanitize"
#: the codec's work limits on the cpu backend (`codec.CodecLimits` fields). The CPU model's cost
#: grows steeply with T (with the default limits a mutated case took up to 30 s, and cases over
#: 0.5 s took half the time; with these, at most ~1 s: 3x the executions per minute), while
#: every launch threshold stays reachable (grid.y at block_size 1: T * K > 65535)
CPU_LIMITS = {"logits_elements": 2**18, "recv_elements": 2**17, "expert_work": 2**24}
STATUS_EVERY_S = 0.25


def codec_limits(backend: str):
    """The codec limits the engine decodes and mutates with on `backend`."""
    from harness.fuzz.codec import LIMITS

    return replace(LIMITS, **CPU_LIMITS) if backend == "cpu" else LIMITS


def write_json(path: Path, obj: dict) -> None:
    """Atomic (temp file + rename), without fsync: status files are rewritten often."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_gpus(spec: str) -> None:
    if spec != "all":
        from harness.errors import HarnessError
        from harness.gpus import parse_gpu_list

        try:
            parse_gpu_list(spec)
        except HarnessError as exc:
            raise ConfigError("gpus", f"'all' or indices like 0,2: {exc}") from None


@dataclass(frozen=True)
class FuzzConfig:
    """One fuzz campaign. `seconds` or `runs` bounds it (`seconds` counts from its start,
    `runs` is shared out among the workers); `seed` None picks a fresh one (reported, so any
    single-worker run can be repeated); `corpus_dir` None is `<findings_dir>/corpus`.
    `moe_mutators` off leaves libFuzzer's byte mutations alone (ablation); `device_coverage`
    off hides the cuda backend's counters; `python_coverage` off skips atheris'
    instrumentation. `sanitizer_every` N > 0 replays every Nth new corpus entry and every new
    finding under compute-sanitizer's memcheck in the background (0: off). `libfuzzer_args`
    pass through.

    Campaign shape: `workers` fuzzing processes (None: one, or one per GPU of `gpus`, "all"
    or "0,2", cuda only), each with its own libFuzzer on the shared corpus (re-read every
    `reload_seconds` when there are several); `ray` ("auto", an address, or "local") runs the
    workers as Ray actors, their corpus synchronised through Ray or the shared `sync_dir`.
    Supervision: a fuzzing process over `rss_limit_mb`, dead, or silent for `stall_seconds`
    is restarted from the corpus. `stats_every`: seconds between statistics samples."""

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
    workers: int | None = None
    gpus: str | None = None
    ray: str | None = None
    sync_dir: Path | None = None
    stats_every: float = 10.0
    reload_seconds: int = 10
    rss_limit_mb: int = 8192
    stall_seconds: float = 120.0
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
        if self.workers is not None and self.workers < 1:
            raise ConfigError("workers", f"must be >= 1, got {self.workers}")
        if self.gpus is not None:
            if self.backend != "cuda":
                raise ConfigError("gpus", f"GPUs are for the cuda backend, not "
                                          f"'{self.backend}'")
            _check_gpus(self.gpus)
        if self.gpus is not None and self.ray is not None:
            raise ConfigError("gpus", "with Ray, Ray gives each worker its GPU (num_gpus=1): "
                                      "give --workers instead of --gpus")
        if self.sync_dir is not None and self.ray is None:
            raise ConfigError("sync_dir", "a sync directory is for Ray workers (--ray)")
        if not (math.isfinite(self.stats_every) and self.stats_every > 0):
            raise ConfigError("stats_every", f"must be > 0 seconds, got {self.stats_every}")
        if self.reload_seconds < 1 or self.rss_limit_mb < 64 or self.stall_seconds <= 0:
            raise ConfigError("reload_seconds/rss_limit_mb/stall_seconds",
                              "must be >= 1 s, >= 64 MB and > 0 s")
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(1, 2**31)
        # a file or an unwritable place given as a directory: one line now, not a traceback
        # after the budget (made by `fuzz`, once nothing else can refuse the run)
        from harness.paths import check_output_dir

        findings = check_output_dir(self.findings_dir, "findings_dir")
        corpus = check_output_dir(self.corpus_dir if self.corpus_dir is not None
                                  else findings / "corpus", "corpus_dir")
        if self.sync_dir is not None:
            check_output_dir(self.sync_dir, "sync_dir")
        return replace(self, seed=seed, findings_dir=findings, corpus_dir=corpus,
                       bugs=tuple(sorted(set(self.bugs))))

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(corpus_dir=str(self.corpus_dir), findings_dir=str(self.findings_dir),
                   bugs=list(self.bugs), libfuzzer_args=list(self.libfuzzer_args),
                   sync_dir=None if self.sync_dir is None else str(self.sync_dir))
        return out

    @classmethod
    def from_json(cls, obj: dict) -> FuzzConfig:
        known = {f.name for f in fields(cls)}
        obj = {k: v for k, v in obj.items() if k in known}
        obj.update(corpus_dir=Path(obj["corpus_dir"]), findings_dir=Path(obj["findings_dir"]),
                   bugs=tuple(obj["bugs"]), libfuzzer_args=tuple(obj["libfuzzer_args"]))
        if obj.get("sync_dir") is not None:
            obj["sync_dir"] = Path(obj["sync_dir"])
        return cls(**obj)


@dataclass
class FuzzStatus:
    """Where a campaign stands, summed over its workers: what the progress callback sees and
    the report is built from.

    `coverage` and `features` are libFuzzer's "cov" (edges) and "ft" (features, edges and
    counters by hit-count bucket), the best worker's (each libFuzzer counts its own);
    `semantic` the distinct semantic feature ids seen (best worker). `restarts` counts the
    case workers restarted (cuda), `fuzzer_restarts` the fuzzing processes restarted after
    they died, hung or ran out of memory. `samples` counts statistics samples (`stats`, the
    last one, as written to the run's stats.jsonl)."""

    seconds: float = 0.0
    executions: int = 0
    coverage: int = 0
    features: int = 0
    semantic: int = 0
    corpus_size: int = 0
    invalid: int = 0
    decode_errors: int = 0
    restarts: int = 0
    fuzzer_restarts: int = 0
    workers: int = 1
    #: corpus inputs handed from one worker to another through Ray
    synced_inputs: int = 0
    findings: list[StoredFinding] = field(default_factory=list)
    #: signatures hit again that an earlier run on the same findings directory had found
    known: list[str] = field(default_factory=list)
    #: cases replayed under memcheck (`sanitizer_every`), its error reports, cases waiting
    sanitized: int = 0
    sanitizer_errors: int = 0
    sanitizer_pending: int = 0
    #: what the campaign started from: corpus inputs and findings of earlier runs
    resumed_inputs: int = 0
    earlier_findings: int = 0
    run_id: str = ""
    #: other campaigns running on the same findings directory when this one started
    concurrent_runs: list[str] = field(default_factory=list)
    samples: int = 0
    stats: dict = field(default_factory=dict)
    #: one line per restart of a fuzzing process, why it was restarted
    events: list[str] = field(default_factory=list)
    done: bool = False
    reason: str = ""

    @property
    def exec_per_s(self) -> float:
        return self.executions / self.seconds if self.seconds > 0 else 0.0


@dataclass
class FuzzReport:
    """The result of `fuzz`: the final status, every finding (this run's and, marked
    `earlier`, those of earlier runs on the same findings directory) and where things are:
    `run_dir` the campaign's own directory, `log` worker 0's libFuzzer log."""

    config: FuzzConfig
    status: FuzzStatus
    findings: list[StoredFinding]
    log: Path
    minimize_errors: list[str] = field(default_factory=list)
    #: what could not be sanitized (`sanitizer_every`), one line each
    sanitizer_problems: list[str] = field(default_factory=list)
    run_dir: Path | None = None

    @property
    def new_findings(self) -> list[StoredFinding]:
        return [f for f in self.findings if not f.earlier]

    def to_json(self) -> dict:
        s = self.status
        return {"seed": self.config.seed, "backend": self.config.backend,
                "run_id": s.run_id, "workers": s.workers,
                "seconds": s.seconds, "executions": s.executions, "exec_per_s": s.exec_per_s,
                "coverage": s.coverage, "features": s.features, "semantic": s.semantic,
                "corpus_size": s.corpus_size, "restarts": s.restarts,
                "fuzzer_restarts": s.fuzzer_restarts, "synced_inputs": s.synced_inputs,
                "reason": s.reason,
                "resumed_inputs": s.resumed_inputs, "earlier_findings": s.earlier_findings,
                "sanitized": s.sanitized, "sanitizer_errors": s.sanitizer_errors,
                "findings": [f.to_json() for f in self.findings], "known": s.known,
                "log": str(self.log),
                "run_dir": None if self.run_dir is None else str(self.run_dir)}
