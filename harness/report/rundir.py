"""Reading a fuzz campaign's run directory: configuration, status, samples over time, findings.

Two layouts are read, the reader being the one place that knows them:
- one run directory per campaign, `<findings>/.fuzz-run/<run-id>/` with `config.json`,
  `status.json`, `stats.jsonl` (one sample per line: seconds, executions, exec_per_s, edges,
  features, corpus_size, ...) and a directory per worker, `w<i>/` with its `libfuzzer.log`
  (`harness.fuzz.rundir`);
- the older single `<findings>/.fuzz-run/` with `config.json`, `status.json` and
  `libfuzzer.log` only: the samples are then libFuzzer's own status lines (`#N NEW cov: ft:
  corp: exec/s:`), indexed by executions (the log has no clock).

`read_run(path)` takes a run directory or a findings directory (its latest run).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

RUN_DIR = ".fuzz-run"
_LOG_LINE = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+)(?: corp: (\d+)/\S+)?"
                       r"(?:.*?exec/s: (\d+))?")


@dataclass
class Sample:
    """Where the campaign stood at one moment (`seconds` None: the log had no clock)."""

    executions: int
    coverage: int
    features: int
    exec_per_s: float | None = None
    corpus_size: int | None = None
    seconds: float | None = None


@dataclass
class Campaign:
    path: Path
    config: dict[str, Any]
    status: dict[str, Any]
    samples: list[Sample]
    #: every finding of the run (this run's first, then earlier ones of its findings dir):
    #: signature, severity, message, seconds, executions, path, minimized, earlier
    findings: list[dict[str, Any]] = field(default_factory=list)
    log: Path | None = None

    @property
    def timed(self) -> bool:
        """Whether the samples have a clock (else they are indexed by executions)."""
        return bool(self.samples) and all(s.seconds is not None for s in self.samples)

    @property
    def base(self) -> Path:
        """The directory the run's relative paths (config, findings) are relative to."""
        return _base(self.path, self.config)

    def resolve(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.base / p

    @property
    def corpus_dir(self) -> Path | None:
        d = self.config.get("corpus_dir")
        return None if not d else self.resolve(d)

    @property
    def findings_dir(self) -> Path:
        return self.resolve(self.config.get("findings_dir", "."))


def _base(run: Path, config: dict[str, Any]) -> Path:
    """The directory the run's relative paths are relative to (where `fuzz` was started):
    found by walking up from the run directory to the findings directory's parent."""
    for parent in [run, *run.parents]:
        if parent.name == RUN_DIR:
            base = parent.parent  # the findings directory, `findings_dir` from the base
            for _ in Path(config.get("findings_dir", ".")).parts:
                base = base.parent
            return base
    return Path.cwd()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise HarnessError(f"{path}: unreadable: {exc}") from None
    return obj if isinstance(obj, dict) else {}


def find_run(path: str | os.PathLike) -> Path:
    """The run directory `path` names: itself, or a findings directory's latest run."""
    p = Path(path)
    if not p.is_dir():
        raise HarnessError(f"{p}: not a run directory or a findings directory")
    if (p / "config.json").exists() or (p / "status.json").exists():
        return p
    root = p / RUN_DIR
    if root.is_dir():
        runs = [d for d in root.iterdir() if d.is_dir() and (d / "config.json").exists()]
        if runs:
            return max(runs, key=lambda d: (d / "config.json").stat().st_mtime)
        if (root / "config.json").exists():
            return root
    raise HarnessError(f"{p}: no fuzz run here (no config.json, no {RUN_DIR}/)")


def _stats(path: Path) -> list[Sample]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                s = json.loads(line)
            except ValueError:  # a line cut by a killed run
                continue
            out.append(Sample(int(s.get("executions", 0)),
                              int(s.get("edges", s.get("coverage", 0))),
                              int(s.get("features", 0)), s.get("exec_per_s"),
                              s.get("corpus_size"), s.get("seconds")))
    return out


def _log_samples(path: Path) -> list[Sample]:
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = _LOG_LINE.match(line)
            if m is None:
                continue
            n, _, cov, ft, corp, eps = m.groups()
            out.append(Sample(int(n), int(cov), int(ft), None if eps is None else float(eps),
                              None if corp is None else int(corp)))
    return out


def read_run(path: str | os.PathLike) -> Campaign:
    """The campaign of a run directory (or of a findings directory's latest run);
    `HarnessError` for a path that holds none."""
    run = find_run(path)
    config, status = _read_json(run / "config.json"), _read_json(run / "status.json")
    stats = sorted(run.glob("*.jsonl"))
    log = run / "libfuzzer.log"
    if not log.exists():  # a campaign's own run directory: worker 0's log
        log = run / "w0" / "libfuzzer.log"
    samples = _stats(stats[0]) if stats else _log_samples(log) if log.exists() else []
    camp = Campaign(run, config, status, samples, log=log if log.exists() else None)
    camp.findings = [dict(f, earlier=False) for f in status.get("findings", [])]
    seen = {f.get("signature") for f in camp.findings}
    try:
        from harness.fuzz.store import FindingStore

        for f in FindingStore(camp.findings_dir).findings():
            if f.signature not in seen:
                camp.findings.append({**f.to_json(), "earlier": True})
    except HarnessError:
        pass
    return camp
