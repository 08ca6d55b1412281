"""The findings store: one directory per finding signature, the first reproducer and its
minimised form as corpus JSON (`harness.corpus`), written atomically, reloaded on start.

    <findings>/<stage>__<check>/<hash>.json            first reproducer (meta.extra.role
                                                        "reproducer")
    <findings>/<stage>__<check>/minimized/<hash>.json  the smallest case with the same signature

Deduplication is by `Finding.signature`: a second input with a known signature is not stored.
Several processes (the workers of a campaign, campaigns sharing the directory) may store into
one directory at once: a signature's directory appears whole, by renaming a staged directory
(atomic; it fails when another process got there first), so a finding is stored once, by
whoever found it first, and the others adopt that reproducer. Metadata (`CaseMeta`): origin
"fuzz", the signature, an expectation (backend, variants -> signature) and in `extra` the
seconds and executions it took to find, the seed, the campaign (`run`), the severity and the
message. A killed run leaves only whole files (corpus writes are atomic); a new `FindingStore`
on the same directory knows every signature found before.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from harness import corpus
from harness.case import MoECase
from harness.corpus.format import CaseMeta, Expectation
from harness.errors import CorpusError
from harness.findings import Finding

MINIMIZED = "minimized"


def signature_dir(signature: str) -> str:
    """The directory name of a signature ("sort_align:no-poison" -> "sort_align__no-poison")."""
    return signature.replace(":", "__", 1)


@dataclass(frozen=True)
class StoredFinding:
    """One deduplicated finding as the store holds it (paths are None until written)."""

    signature: str
    severity: str
    message: str
    seconds: float | None
    executions: int | None
    path: Path
    minimized: Path | None = None
    #: found by an earlier run on the same directory (reloaded, not found in this one)
    earlier: bool = False
    #: the campaign that stored the reproducer (None: unknown, or stored before runs had ids)
    run: str | None = None

    def to_json(self) -> dict:
        return {"signature": self.signature, "severity": self.severity, "message": self.message,
                "seconds": self.seconds, "executions": self.executions, "path": str(self.path),
                "minimized": None if self.minimized is None else str(self.minimized),
                "earlier": self.earlier, "run": self.run}

    @classmethod
    def from_json(cls, obj: dict) -> StoredFinding:
        return cls(obj["signature"], obj["severity"], obj["message"], obj["seconds"],
                   obj["executions"], Path(obj["path"]),
                   None if obj.get("minimized") is None else Path(obj["minimized"]),
                   bool(obj.get("earlier", False)), obj.get("run"))


def _number(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


class FindingStore:
    """Findings of fuzz runs of one backend and variant set in `directory`, by signature.

    `backend`, `bugs`, `seed` and `run` (the campaign's id) go into the metadata only: the
    store never interprets them.
    """

    def __init__(self, directory: str | Path, backend: str = "cpu",
                 bugs: tuple[str, ...] | list[str] = (), seed: int | None = None,
                 run: str | None = None) -> None:
        self.directory = Path(directory)
        self.backend = backend
        self.bugs = tuple(sorted(set(bugs)))
        self.seed = seed
        self.run = run
        self._found: dict[str, StoredFinding] = {}
        self.reload()

    # -- reading ---------------------------------------------------------------------------

    def reload(self) -> None:
        """(Re)read every finding under the directory; unreadable files are skipped."""
        self._found.clear()
        if not self.directory.is_dir():
            return
        # dot directories: campaigns' run directories, staged findings (never findings)
        for sigdir in sorted(p for p in self.directory.iterdir()
                             if p.is_dir() and not p.name.startswith(".")):
            for stored in self._read_sigdir(sigdir):
                self._found.setdefault(stored.signature, stored)

    def _read_sigdir(self, sigdir: Path) -> list[StoredFinding]:
        """The reproducers in one signature directory (normally one), as earlier findings."""
        out = []
        for path in sorted(sigdir.glob("*.json")):
            try:
                _, meta = corpus.load(path)
            except CorpusError:
                continue
            if meta.origin != "fuzz" or meta.signature is None:
                continue
            extra = meta.extra
            execs = extra.get("executions_to_find")
            run = extra.get("run")
            minimized, severity = self._minimized(sigdir)
            out.append(StoredFinding(
                meta.signature, severity or str(extra.get("severity", "legal")),
                str(extra.get("message", "")), _number(extra.get("seconds_to_find")),
                execs if isinstance(execs, int) and not isinstance(execs, bool) else None,
                path, minimized, earlier=True, run=run if isinstance(run, str) else None))
        return out

    @staticmethod
    def _minimized(sigdir: Path) -> tuple[Path | None, str | None]:
        """The minimised reproducer and its severity (the finding's severity from then on:
        see `record_minimized`), or (None, None)."""
        for path in sorted((sigdir / MINIMIZED).glob("*.json")):
            try:
                case, meta = corpus.load(path)
            except CorpusError:
                continue
            return path, str(meta.extra.get("severity", case.severity))
        return None, None

    def __contains__(self, signature: str) -> bool:
        return signature in self._found

    def __len__(self) -> int:
        return len(self._found)

    def get(self, signature: str) -> StoredFinding | None:
        return self._found.get(signature)

    def findings(self) -> list[StoredFinding]:
        """Every finding, earliest found first (reloaded ones keep their order on disk)."""
        return list(self._found.values())

    def load_case(self, signature: str, minimized: bool = False) -> MoECase:
        """The stored reproducer (or its minimised form) of `signature`."""
        f = self._found[signature]
        path = f.minimized if minimized and f.minimized is not None else f.path
        return corpus.load(path)[0]

    # -- writing ---------------------------------------------------------------------------

    def _meta(self, finding: Finding, role: str, **extra: object) -> CaseMeta:
        return CaseMeta(
            origin="fuzz", signature=finding.signature,
            expect=(Expectation(self.backend, self.bugs, finding.signature),),
            note=f"found by moe-harness fuzz ({role})",
            extra={"role": role, "backend": self.backend, "variants": list(self.bugs),
                   "seed": self.seed, "run": self.run, "severity": finding.severity,
                   "message": finding.message[:500], **extra})

    def record(self, case: MoECase, finding: Finding, seconds: float,
               executions: int) -> StoredFinding | None:
        """Store `case` as the reproducer of `finding` if its signature is new to this store;
        return the new entry, or None for a signature it knew. When another process stored
        the signature first (since this store was loaded), its reproducer is kept and the
        entry returned points at it (`run` says whose it is); `seconds` and `executions` are
        always the caller's."""
        if finding.signature in self._found:
            return None
        sigdir = self.directory / signature_dir(finding.signature)
        meta = self._meta(finding, "reproducer", seconds_to_find=round(seconds, 3),
                          executions_to_find=executions)
        path = self._claim(case, sigdir, meta)
        if path is None:  # stored by another process first: adopt its reproducer
            theirs = next((f for f in self._read_sigdir(sigdir)
                           if f.signature == finding.signature), None)
            path = theirs.path if theirs is not None else corpus.save(case, sigdir, meta)
            stored = StoredFinding(finding.signature, finding.severity, finding.message,
                                   seconds, executions, path,
                                   theirs.minimized if theirs is not None else None,
                                   run=theirs.run if theirs is not None else self.run)
        else:
            stored = StoredFinding(finding.signature, finding.severity, finding.message,
                                   seconds, executions, path, run=self.run)
        self._found[finding.signature] = stored
        return stored

    def _claim(self, case: MoECase, sigdir: Path, meta: CaseMeta) -> Path | None:
        """Write the reproducer into a staged directory and rename it to `sigdir`: the path
        stored, or None when `sigdir` already holds a finding (another process was first)."""
        if any(sigdir.glob("*.json")):
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".staged-{sigdir.name}-", dir=self.directory))
        try:
            path = corpus.save(case, staged, meta)
            try:
                os.rename(staged, sigdir)  # atomic; replaces an empty directory only
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                return None
            return sigdir / path.name
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def record_minimized(self, signature: str, case: MoECase, runs: int,
                         seconds: float) -> StoredFinding:
        """Store the minimised reproducer of a known signature (replacing an earlier one).

        The entry returned takes the minimised case's severity: a finding whose first input
        was out of contract but whose minimised form is legal is a bug on legal input, and the
        table, status.json and the minimised file say the same."""
        old = self._found[signature]
        sigdir = self.directory / signature_dir(signature)
        # the minimised case may have shed what made the original out of contract or faulty
        finding = Finding(*signature.split(":", 1), old.message, case.severity)
        meta = self._meta(finding, "minimized", minimized_from=old.path.stem,
                          minimize_runs=runs, minimize_seconds=round(seconds, 3))
        path = corpus.save(case, sigdir / MINIMIZED, meta)
        for stale in (sigdir / MINIMIZED).glob("*.json"):
            if stale != path:
                stale.unlink(missing_ok=True)
        new = replace(old, minimized=path, severity=finding.severity)
        self._found[signature] = new
        return new
