"""`fuzz --sanitizer-every N`: corpus entries and findings of a running fuzz replayed under
compute-sanitizer's memcheck, in a separate process, while the fuzzer goes on.

    corpus dir (libFuzzer's byte files) --every Nth new one, codec.decode--> <run>/sanitize/corpus
    findings (the child's stored reproducers) -----------------------------------------+
                                                                                       v
        one batch at a time (`harness.sanitizer.run.sanitize_in_background`: one sanitizer process
        for many cases, its start-up paid once; what arrives meanwhile waits for the next batch)
                                                                                       v
        reports -> the case file's metadata, as `harness.sanitizer.triage` attaches them; an
        error on a corpus entry -> a new finding "<stage>:sanitizer-<kind>" in the `FindingStore`

The fuzz parent drives it from its polling loop (`poll`): nothing here blocks the fuzzer.
Replays run on the fuzz backend with the fuzz variants (handed on unread), with redzones and
poison off, as triage does, so that memcheck sees every out-of-bounds access. On the cpu
backend there is no kernel to watch: that combination exists for tests (a stand-in sanitizer).
A replay always runs eagerly, also for a `--graph` fuzz run.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from harness import corpus
from harness.corpus.format import CaseMeta
from harness.errors import HarnessError, SanitizerUnavailable
from harness.findings import Finding
from harness.fuzz.store import FindingStore, StoredFinding
from harness.sanitizer.run import (
    SanitizerConfig,
    SanitizerRun,
    find_sanitizer,
    sanitize_in_background,
)

TOOL = "memcheck"
#: the check name of a sanitizer finding starts with this ("gating:sanitizer-<kind>")
CHECK_PREFIX = "sanitizer-"
#: cases in one sanitizer process at most (a crash costs only its own case: the rest rerun)
MAX_BATCH = 64
#: a corpus file younger than this may still be being written by libFuzzer
SETTLE_S = 0.25


def is_sanitizer_signature(signature: str) -> bool:
    """A finding this module made (not the fuzz target's; nothing for the minimiser)."""
    return signature.partition(":")[2].startswith(CHECK_PREFIX)


def check_available(backend: str, config: SanitizerConfig) -> None:
    """Before the fuzzer starts: `SanitizerUnavailable` without compute-sanitizer, for a bad
    tool, or without a CUDA GPU for a backend that needs one."""
    config.validate()
    find_sanitizer(config.executable)
    if backend != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise SanitizerUnavailable(
                f"--sanitizer-every on the {backend} backend needs a CUDA GPU: "
                "torch.cuda.is_available() is False")


@dataclass(frozen=True)
class _Item:
    """One case to sanitize: a decoded corpus entry or a finding's reproducer."""

    path: Path
    kind: str  # "corpus" | "finding"
    label: str  # the libFuzzer file name or the finding's signature
    seconds: float  # when the fuzz run produced it
    executions: int


class BackgroundSanitizer:
    """Queues every `every`-th new corpus entry and every new finding, runs them in batches
    under memcheck, attaches the reports and stores sanitizer findings. Counters: `sanitized`
    (cases replayed under the sanitizer), `errors` (its error reports), `findings` (new sanitizer
    findings), `problems` (what could not be sanitized, one line each)."""

    def __init__(self, every: int, backend: str, bugs: tuple[str, ...], store: FindingStore,
                 corpus_dir: Path, work_dir: Path, limits,
                 config: SanitizerConfig | None = None) -> None:
        self.every, self.backend, self.bugs, self.store = every, backend, bugs, store
        self.corpus_dir, self.limits = corpus_dir, limits
        self.config = config or SanitizerConfig(tool=TOOL)
        self.work_dir = work_dir
        shutil.rmtree(work_dir, ignore_errors=True)  # scratch of an earlier run
        (work_dir / "corpus").mkdir(parents=True)
        self.sanitized = self.errors = 0
        self.findings: list[StoredFinding] = []
        self.problems: list[str] = []
        self._known = self._listing()  # entries of earlier runs are not new
        self._new_entries = 0
        self._queued_paths: set[Path] = set()
        self._queued_findings: set[str] = set()
        self._queue: list[_Item] = []
        self._batch: list[_Item] = []
        self._future: Future[SanitizerRun] | None = None
        self._batches = 0
        self._disabled = False

    @property
    def pending(self) -> int:
        """Cases queued or being sanitized."""
        return len(self._queue) + len(self._batch)

    def _listing(self) -> set[str]:
        try:
            return {p.name for p in self.corpus_dir.iterdir() if p.is_file()}
        except OSError:
            return set()

    # -- feeding -------------------------------------------------------------------------------

    def _scan_corpus(self, seconds: float, executions: int, final: bool) -> None:
        """Queue every `every`-th corpus file that appeared since the last scan (oldest first)."""
        now = time.time()
        fresh = []
        for name in self._listing() - self._known:
            try:
                st = (self.corpus_dir / name).stat()
            except OSError:  # libFuzzer replaced it by a smaller input
                self._known.add(name)
                continue
            if final or now - st.st_mtime >= SETTLE_S:
                fresh.append((st.st_mtime, name))
        from harness.fuzz import codec

        for _, name in sorted(fresh):
            self._known.add(name)
            self._new_entries += 1
            if self._new_entries % self.every:
                continue
            try:
                case = codec.decode((self.corpus_dir / name).read_bytes(), self.limits)
                meta = CaseMeta(origin="fuzz-corpus", note=f"libFuzzer corpus entry {name}",
                                extra={"corpus_file": name, "backend": self.backend,
                                       "variants": list(self.bugs)})
                path = corpus.save(case, self.work_dir / "corpus", meta)
            except (OSError, HarnessError) as exc:
                self.problems.append(f"corpus entry {name}: not sanitized: {exc}")
                continue
            if path not in self._queued_paths:  # two entries may decode to one case
                self._queued_paths.add(path)
                self._queue.append(_Item(path, "corpus", name, seconds, executions))

    def _queue_findings(self, findings: list[StoredFinding]) -> None:
        for f in findings:
            if f.earlier or f.signature in self._queued_findings \
                    or is_sanitizer_signature(f.signature):
                continue
            self._queued_findings.add(f.signature)
            self._queue.append(_Item(Path(f.path), "finding", f.signature,
                                     f.seconds or 0.0, f.executions or 0))

    def poll(self, findings: list[StoredFinding], seconds: float, executions: int,
             final: bool = False) -> None:
        """One step of the fuzz parent's loop: collect a finished batch, queue what is new
        (`final`: the child has stopped, take every corpus file), start the next batch."""
        if self._future is not None and self._future.done():
            self._collect(self._future)
        if self._disabled:
            return
        self._scan_corpus(seconds, executions, final)
        self._queue_findings(findings)
        if self._future is None and self._queue:
            self._batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            keep = self.work_dir / f"batch-{self._batches}"
            self._batches += 1
            cfg = dataclasses.replace(self.config, tool=TOOL, keep_dir=str(keep))
            # one input often has several findings: its case is replayed once
            paths = list({i.path.stem: i.path for i in self._batch}.values())
            self._future = sanitize_in_background(paths, TOOL, self.backend, self.bugs,
                                                  redzones=False, config=cfg)

    def wait(self, findings: list[StoredFinding], seconds: float, executions: int,
             tick=None, step_s: float = 0.25) -> None:
        """After the child stopped: queue the rest, run every batch to its end; `tick()` after
        each step (progress). Ctrl-C stops waiting (what is left is reported unsanitized)."""
        try:
            self.poll(findings, seconds, executions, final=True)
            while self._future is not None:
                time.sleep(step_s)
                self.poll(findings, seconds, executions, final=True)
                if tick is not None:
                    tick()
        except KeyboardInterrupt:
            left = self.pending
            self._queue, self._batch, self._future = [], [], None
            self.problems.append(f"interrupted: {left} case(s) left unsanitized")

    # -- results -------------------------------------------------------------------------------

    def _collect(self, future: Future[SanitizerRun]) -> None:
        batch, self._batch, self._future = self._batch, [], None
        try:
            run = future.result()
        except SanitizerUnavailable as exc:  # e.g. the device is not supported
            left = len(batch) + len(self._queue)
            self._disabled, self._queue = True, []
            self.problems.append(f"compute-sanitizer stopped working: {exc}; {left} case(s) "
                                 "and everything after left unsanitized")
            return
        except Exception as exc:  # a report, never a crash of the fuzz run
            self.problems.append(f"a sanitizer batch of {len(batch)} case(s) failed: "
                                 f"{type(exc).__name__}: {exc}")
            return
        from harness.sanitizer.triage import attach_reports, tool_run

        self.problems.extend(f"sanitizer: {p}" for p in run.problems)
        unmapped = [r for r in run.unmapped if r.level == "error"]
        if unmapped:
            self.errors += len(unmapped)
            self.problems.append(f"sanitizer: {len(unmapped)} error report(s) not mapped to a "
                                 f"case (kept in {self.work_dir})")
        by_case = {Path(c.path).stem: c for c in run.cases}  # file name = content hash
        for item in batch:
            result = by_case[item.path.stem]
            if result.status == "not-run":
                self.problems.append(f"{item.label}: not sanitized ({result.message})")
                continue
            self.sanitized += 1
            self.errors += len(result.errors)
            if result.status in ("timeout", "crashed", "error"):
                self.problems.append(f"{item.label} under {TOOL}: {result.status}: "
                                     f"{result.message[:200]}")
            runs = {TOOL: tool_run(TOOL, result.status, result.reports)}
            try:
                attach_reports(item.path, runs)
                if item.kind == "corpus" and result.errors:
                    self._record(item, result.errors, runs)
            except (OSError, HarnessError) as exc:
                self.problems.append(f"{item.label}: sanitizer report not stored: {exc}")

    def _record(self, item: _Item, errors, runs: dict) -> None:
        """Store a corpus entry with sanitizer errors as a finding per (stage, error kind)."""
        from harness.sanitizer.triage import attach_reports

        case, _ = corpus.load(item.path)
        for rep in errors:
            finding = Finding(rep.stage or "unknown", f"{CHECK_PREFIX}{rep.kind}",
                              f"{TOOL}: {rep}"[:500], case.severity,
                              {"report": rep.to_json(), "corpus_file": item.label})
            stored = self.store.record(case, finding, item.seconds, item.executions)
            if stored is not None:
                attach_reports(stored.path, runs)
                self.findings.append(stored)
