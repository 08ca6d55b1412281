"""compute-sanitizer wrappers: replay many cases under one sanitizer process, and triage.

    replay_under_sanitizer(cases, "memcheck")  ->  SanitizerRun (per case: status, findings,
                                                   SanitizerReports mapped to case and stage)

The cases run in one process (`harness.sanitizer.child`, one start-up of the sanitizer and of
torch) that prints a marker before each case and around each stage; compute-sanitizer's text
records land between those markers on the same terminal (a pty, so neither side buffers), and
its XML records (`--xml --save FILE`) are matched to them in order: each report gets the case
and stage that were running. Our kernels are also named in a kernel -> stage table
(`report.kernel_stages`), which wins for the stage. Crash isolation: a case that
crashes the process, hangs past `case_timeout_s` or loses the CUDA context (memcheck's default
on an illegal access) ends that process; the rest of the cases run in a new one.

The replay always runs with PYTORCH_NO_CUDA_MEMORY_CACHING=1: with PyTorch's caching allocator
on, an out-of-bounds write that stays inside the allocator's pool is invisible to memcheck
(measured on an H100: 0 errors with caching, the write reported without).

`redzones=True` keeps the cuda backend's guard bands and poison: small overruns then land in
memory the sanitizer sees as allocated. Pass `redzones=False` to test the sanitizer alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import BackendUnavailable, CorpusError, HarnessError, SanitizerUnavailable
from harness.isolation import describe_exit
from harness.sanitizer.child import EXIT_CONTEXT_LOST, MARKER
from harness.sanitizer.report import (
    ParsedOutput,
    SanitizerReport,
    kernel_stages,
    parse_text_lines,
    parse_xml,
    same_record,
    sanitizer_line,
    with_place,
)

#: compute-sanitizer's tools, memcheck and initcheck (the default triage) first
TOOLS = ("memcheck", "initcheck", "racecheck", "synccheck")
#: the environment every replay child gets (see the module docstring)
CHILD_ENV = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1", "PYTHONUNBUFFERED": "1"}
_SEARCH_DIRS = ("bin", "compute-sanitizer")  # CUDA 12+: bin/; CUDA 11: compute-sanitizer/
_DEFAULT_ROOTS = ("/usr/local/cuda",)
#: seconds a replay process may take to exit after its last case (the sanitizer's teardown)
EXIT_GRACE_S = 120.0


@dataclass(frozen=True)
class SanitizerConfig:
    """How to run compute-sanitizer. `executable` None: found on PATH, $CUDA_HOME, $CUDA_PATH
    or /usr/local/cuda. Time-outs: `startup_timeout_s` until the first case starts (torch
    import and a first kernel build under the sanitizer), `case_timeout_s` per case after."""

    tool: str = "memcheck"
    executable: str | None = None
    case_timeout_s: float = 300.0
    startup_timeout_s: float = 900.0
    extra_args: tuple[str, ...] = ()
    print_limit: int = 1000
    python: str = sys.executable
    keep_dir: str | None = None  # keep manifests, XML and logs here (default: a temp dir)
    use_pty: bool = True

    def validate(self) -> None:
        if self.tool not in TOOLS:
            raise SanitizerUnavailable(f"unknown compute-sanitizer tool '{self.tool}' "
                                       f"(known: {', '.join(TOOLS)})")
        if self.case_timeout_s <= 0 or self.startup_timeout_s <= 0:
            raise SanitizerUnavailable("sanitizer time-outs must be positive")


def find_sanitizer(explicit: str | None = None) -> str:
    """The compute-sanitizer executable; `SanitizerUnavailable` naming where it looked."""
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise SanitizerUnavailable(f"compute-sanitizer not found or not executable: "
                                       f"{explicit}")
        return found
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + list(_DEFAULT_ROOTS)
    looked = []
    for root in filter(None, roots):
        for sub in _SEARCH_DIRS:
            cand = Path(root) / sub / "compute-sanitizer"
            looked.append(str(cand))
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    raise SanitizerUnavailable(
        "compute-sanitizer not found (it ships with the CUDA toolkit): put it on PATH or set "
        f"CUDA_HOME (looked on PATH and in {', '.join(looked)})")


@functools.cache
def _xml_args(executable: str) -> tuple[str, ...]:
    """`--xml` is a flag in compute-sanitizer 2025.x ("--xml yes" is refused); older
    releases took a value: ask the executable's --help which it is."""
    try:
        text = subprocess.run([executable, "--help"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ("--xml",)
    return ("--xml", "yes") if "--xml arg" in text else ("--xml",)


def child_env() -> dict[str, str]:
    """The replay child's environment: ours, PYTORCH_NO_CUDA_MEMORY_CACHING=1, and this
    checkout importable (a source tree used without `pip install -e`)."""
    env = {**os.environ, **CHILD_ENV}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def build_command(config: SanitizerConfig | None, manifest: Path,
                  xml_path: Path | None) -> list[str]:
    """argv of one replay process: under compute-sanitizer, or bare if `config` is None."""
    replay = [(config.python if config else sys.executable), "-m", "harness.sanitizer.child",
              str(manifest)]
    if config is None:
        return replay
    exe = find_sanitizer(config.executable)
    # the replay's exit code is protocol (3: context lost), not an error to report
    return [exe, "--tool", config.tool, *_xml_args(exe), "--save", str(xml_path),
            "--print-limit", str(config.print_limit), "--target-processes", "application-only",
            "--check-exit-code", "no", *config.extra_args, *replay]


# -- results -----------------------------------------------------------------------------------


@dataclass
class CaseResult:
    """One replayed case. `status`: clean | findings | rejected (a contract error) | error
    (could not be loaded or run) | timeout | crashed | not-run. `set_aside`: findings of the
    checks that need poison, on a replay without it (`child.POISON_CHECKS`): kept
    for the reader, not counted. `bugs`: the variants it ran with."""

    index: int
    path: str
    status: str = "not-run"
    findings: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""
    seconds: float = 0.0
    reports: list[SanitizerReport] = field(default_factory=list)
    set_aside: list[dict[str, Any]] = field(default_factory=list)
    bugs: tuple[str, ...] = ()

    @property
    def errors(self) -> list[SanitizerReport]:
        return [r for r in self.reports if r.level == "error"]

    @property
    def bad(self) -> bool:
        """A finding, a sanitizer error, a hang or a crash."""
        return bool(self.findings or self.errors) or self.status in (
            "timeout", "crashed", "error")


@dataclass
class SanitizerRun:
    """Everything a replay produced: per case, all reports (in order; `case` None where the
    case could not be told), and whether any output file was cut short."""

    tool: str | None
    cases: list[CaseResult]
    reports: list[SanitizerReport] = field(default_factory=list)
    truncated: bool = False
    problems: list[str] = field(default_factory=list)
    processes: int = 0
    seconds: float = 0.0

    @property
    def unmapped(self) -> list[SanitizerReport]:
        return [r for r in self.reports if r.case is None]

    @property
    def case_seconds(self) -> float:
        """Time spent inside cases (start-up excluded), for slowdown factors."""
        return sum(c.seconds for c in self.cases)

    @property
    def bad(self) -> bool:
        return any(c.bad for c in self.cases) or any(r.level == "error" for r in self.unmapped)


# -- one process -------------------------------------------------------------------------------


@dataclass
class _ProcessLog:
    """What one replay process printed, in order: ("marker", dict) and ("san", payload)."""

    events: list[tuple[str, Any]] = field(default_factory=list)
    returncode: int | None = None
    timed_out: bool = False
    stderr_tail: str = ""
    other_tail: list[str] = field(default_factory=list)


def _spawn(argv: list[str], env: dict[str, str], use_pty: bool,
           stderr) -> tuple[subprocess.Popen, int]:
    """Start `argv` in its own process group; stdout on a pty (both the sanitizer and the
    replay then write line by line) or a pipe. Returns the process and the fd to read."""
    if use_pty:
        import pty
        import tty

        master, slave = pty.openpty()
        tty.setraw(slave)  # no echo, no "\r\n"
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=stderr,
                                    env=env, start_new_session=True)
        except OSError:
            os.close(master)
            raise
        finally:
            os.close(slave)
        return proc, master
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=stderr, env=env, start_new_session=True)
    return proc, proc.stdout.fileno()  # type: ignore[union-attr]


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _run_process(argv: list[str], config: SanitizerConfig, workdir: Path,
                 attempt: int) -> _ProcessLog:
    """Run one replay process to its end or its time-out, collecting its output in order."""
    log = _ProcessLog()
    err_path = workdir / f"stderr-{attempt}.txt"
    with open(err_path, "wb") as err:
        try:
            proc, fd = _spawn(argv, child_env(), config.use_pty, err)
        except OSError as exc:
            raise SanitizerUnavailable(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + config.startup_timeout_s
        pending = b""
        quiet_after_exit = 0
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.timed_out = True
                    _kill(proc)
                    break
                ready, _, _ = select.select([fd], [], [], min(left, 1.0))
                if not ready:
                    # exited, but a leftover descendant holds the terminal open
                    quiet_after_exit = quiet_after_exit + 1 if proc.poll() is not None else 0
                    if quiet_after_exit >= 3:
                        _kill(proc)
                        break
                    continue
                try:
                    chunk = os.read(fd, 1 << 16)
                except OSError:  # EIO: every writer of the pty is gone
                    chunk = b""
                if not chunk:
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                for raw in lines:
                    ev = _line_event(raw.decode("utf-8", "replace").rstrip("\r"), log)
                    if ev in ("case", "case-end", "case-error"):
                        deadline = time.monotonic() + config.case_timeout_s
                    elif ev in ("done", "context-lost"):
                        deadline = time.monotonic() + EXIT_GRACE_S
        finally:
            if config.use_pty:
                os.close(fd)
        if pending:
            _line_event(pending.decode("utf-8", "replace"), log)
        try:
            log.returncode = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            log.timed_out = True
            _kill(proc)
            log.returncode = proc.returncode
    log.stderr_tail = err_path.read_text(encoding="utf-8", errors="replace")[-2000:]
    return log


def _line_event(line: str, log: _ProcessLog) -> str | None:
    """File one output line in `log`; the marker's event name, if it was one."""
    if line.startswith(MARKER):
        try:
            marker = json.loads(line[len(MARKER):])
        except json.JSONDecodeError:
            return None
        log.events.append(("marker", marker))
        return marker.get("ev")
    payload = sanitizer_line(line)
    if payload is not None:
        log.events.append(("san", payload))
    elif line.strip():
        log.other_tail = [*log.other_tail[-20:], line]
    return None


# -- interpreting one process ------------------------------------------------------------------


def _text_records(log: _ProcessLog, tool: str) -> tuple[ParsedOutput, list[tuple[int | None,
                                                                            str | None]]]:
    """The text records of a process, each with the (case, stage) running when it began."""
    def tagged():
        case = stage = None
        for kind, item in log.events:
            if kind == "marker":
                if item.get("ev") in ("case", "stage"):
                    case, stage = item.get("i"), item.get("stage")
            else:
                yield item, (case, stage)

    return parse_text_lines(tagged(), tool, kernel_stages())


def _device_error_case(cases: dict[int, CaseResult], started: list[int]) -> int | None:
    """The case of this process whose run ended in a device error (illegal address)."""
    hits = [i for i in started if any(f.get("check") == "illegal-access"
                                      and f.get("details", {}).get("buffer") == "<device>"
                                      for f in cases[i].findings)]
    return hits[0] if len(hits) == 1 else None


def _place_reports(parsed: ParsedOutput, text: ParsedOutput,
                   places: list[tuple[int | None, str | None]],
                   cases: dict[int, CaseResult], started: list[int]) -> list[SanitizerReport]:
    """Place each XML record: by its own host frames where they name the case; else at the
    case and stage of its text twin (same headline, in order); else at the only case of the
    process or the case that hit a device error."""
    placed: list[SanitizerReport] = []
    cursor = 0
    for rep in parsed.reports:
        twin = next((k for k in range(cursor, len(text.reports))
                     if same_record(rep.message, text.reports[k].message)), None)
        if twin is not None:
            cursor = twin + 1
            case, stage = places[twin]
            placed.append(with_place(rep, case, stage, "markers", text.reports[twin]))
        elif len(started) == 1:
            placed.append(with_place(rep, started[0], rep.stage, "single-case"))
        elif (dev := _device_error_case(cases, started)) is not None and \
                rep.kind.startswith(("invalid", "api-error")):
            placed.append(with_place(rep, dev, rep.stage, "device-error"))
        else:
            placed.append(rep)
    return placed


def _interpret(log: _ProcessLog, tool: str | None, xml_path: Path | None,
               cases: dict[int, CaseResult], run: SanitizerRun) -> list[int]:
    """Update `cases` and `run` from one process; the indices of the cases it started."""
    started: list[int] = []
    saw_start = False
    for kind, m in log.events:
        if kind != "marker":
            continue
        ev, i = m.get("ev"), m.get("i")
        if ev == "start":
            saw_start = True
        elif ev == "unavailable":
            why = m.get("message", "the replay backend cannot run here")
            raise SanitizerUnavailable(why) if tool else BackendUnavailable(why)
        elif ev == "case" and i in cases:
            started.append(i)
            cases[i].status, cases[i].message = "crashed", ""
        elif ev == "case-end" and i in cases:
            c = cases[i]
            c.findings, c.seconds = list(m.get("findings", [])), float(m.get("seconds", 0.0))
            c.set_aside = list(m.get("set_aside", []))
            c.status = "findings" if c.findings else ("rejected" if m.get("rejected")
                                                      else "clean")
            c.message = m.get("rejected") or ""
        elif ev == "case-error" and i in cases:
            cases[i].status, cases[i].message = "error", m.get("message", "")
    text, places = _text_records(log, tool or "")
    problems = text.problems
    run.problems.extend(problems)
    if not saw_start:
        if problems or (log.returncode not in (0, None) and not log.timed_out):
            what = "; ".join(problems) or (log.stderr_tail.strip().splitlines() or
                                           log.other_tail or ["no output"])[-1]
            if tool is None:
                raise BackendUnavailable(f"the replay process failed to start (exit "
                                         f"{log.returncode}): {what}")
            raise SanitizerUnavailable(f"compute-sanitizer stopped before the replay started "
                                       f"(exit {log.returncode}): {what}")
    unfinished = [i for i in started if cases[i].status == "crashed"]
    for i in unfinished:
        if log.timed_out:
            cases[i].status = "timeout"
            cases[i].message = "no progress within the time-out (a hang?)"
        else:
            cases[i].message = (f"the replay process died ({describe_exit(log.returncode)}): "
                                f"{log.stderr_tail.strip()[-300:]}")
    if tool is not None:
        parsed = parse_xml(xml_path, tool) if xml_path is not None and xml_path.exists() \
            else ParsedOutput(truncated=True, problem="no XML output was written")
        if not parsed.reports and text.reports and parsed.truncated:
            parsed = ParsedOutput(reports=text.reports, truncated=True,
                                  problem=parsed.problem)  # the text records stand in
        run.truncated |= parsed.truncated and bool(started)
        if parsed.truncated and parsed.problem and started:
            run.problems.append(f"{xml_path}: {parsed.problem}")
        for rep in _place_reports(parsed, text, places, cases, started):
            run.reports.append(rep)
            if rep.case in cases:
                cases[rep.case].reports.append(rep)
    return started


# -- the API -----------------------------------------------------------------------------------


def _collect(items: Iterable[Any], workdir: Path, bugs: tuple[str, ...]
             ) -> tuple[list[tuple[int, str, tuple[str, ...]]], list[CaseResult]]:
    """(index, path, variants) of every case: files, directories (recursively) and `MoECase`s
    (saved under `workdir`), each with `bugs`, or given as a pair (item, its own variants);
    and a CaseResult with status "error" for each file under a directory that cannot be
    loaded (the rest still replay). Every file is loaded once here, so a bad file named on
    its own fails before anything runs (`CorpusError`)."""
    from harness import corpus
    from harness.bugs import BugSet
    from harness.case import MoECase

    out: list[tuple[str, tuple[str, ...]]] = []
    unreadable: list[tuple[str, str]] = []
    for item in items:
        own = bugs
        if isinstance(item, tuple) and len(item) == 2:
            item, own = item[0], tuple(sorted(BugSet.of(list(item[1])).names))
        if isinstance(item, MoECase):
            out.append((str(corpus.save(item, workdir / "cases")), own))
            continue
        p = Path(item)
        if not p.exists():
            raise HarnessError(f"{p}: no such case file or directory")
        for f in corpus.iter_corpus(p):
            try:
                corpus.load(f)
            except CorpusError as exc:
                if not p.is_dir():
                    raise
                unreadable.append((str(f), str(exc)))
                continue
            out.append((str(f), own))
    if not out and not unreadable:
        raise HarnessError("no cases to replay (no .json case files found)")
    entries = [(i, path, own) for i, (path, own) in enumerate(out)]
    bad = [CaseResult(len(out) + i, path, "error", message=f"unreadable: {why}")
           for i, (path, why) in enumerate(unreadable)]
    return entries, bad


#: the buffer size (`MoECase.memory_estimate`, bytes) up to which `small_cases` keeps a case:
#: initcheck without poison took over 150 s on an H200 for the one seed above it (2,048 rows x
#: K = 32, 65,536 m-blocks: 3.2 MB), against under 16 s for all nine seeds with poison on
SMALL_CASE_BYTES = 1 << 20


def small_cases(items: Iterable[str | os.PathLike],
                max_bytes: int = SMALL_CASE_BYTES) -> tuple[list[Path], list[Path]]:
    """(kept, left out): the case files under `items` whose buffers take at most `max_bytes`;
    for the slow tools (initcheck without poison) over a corpus that holds large cases."""
    from harness import corpus

    kept: list[Path] = []
    left: list[Path] = []
    for item in items:
        for f in corpus.iter_corpus(Path(item)):
            case, _ = corpus.load(f)
            size = sum(b.bytes for b in case.memory_estimate())
            (kept if size <= max_bytes else left).append(Path(f))
    return kept, left


def replay_cases(cases: Iterable[Any], tool: str | None = None, backend: str = "cuda",
                 bugs: Iterable[str] = (), redzones: bool = True,
                 config: SanitizerConfig | None = None) -> SanitizerRun:
    """Replay `cases` (files, directories, `MoECase`s; or (item, variants) pairs, which run
    with their own variants instead of `bugs`) in as few processes as crashes allow, under
    compute-sanitizer's `tool` (None: bare, e.g. for crash isolation or a baseline)."""
    from harness.bugs import BugSet

    bug_names = sorted(BugSet.of(list(bugs)).names)  # UnknownVariant before anything runs
    if tool is not None:
        config = SanitizerConfig(tool=tool) if config is None else \
            dataclasses.replace(config, tool=tool)
        config.validate()
        find_sanitizer(config.executable)
    base = config or SanitizerConfig()
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        if base.keep_dir:
            workdir = Path(base.keep_dir)
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="moe-sanitizer-")))
        entries, unreadable = _collect(cases, workdir, tuple(bug_names))
        results = {i: CaseResult(i, p, bugs=b) for i, p, b in entries}
        run = SanitizerRun(tool, [*results.values(), *unreadable])
        pending = entries
        while pending:
            attempt = run.processes
            manifest = workdir / f"manifest-{attempt}.json"
            manifest.write_text(json.dumps({
                "backend": backend, "bugs": bug_names, "checks": redzones,
                "cases": [{"index": i, "path": p, "bugs": list(b)} for i, p, b in pending]}),
                encoding="utf-8")
            xml_path = workdir / f"{tool}-{attempt}.xml" if tool else None
            argv = build_command(config if tool else None, manifest, xml_path)
            log = _run_process(argv, base, workdir, attempt)
            run.processes += 1
            started = _interpret(log, tool, xml_path, results, run)
            if not started:
                why = "start-up timed out" if log.timed_out else \
                    f"the process ended (exit {log.returncode}) before its first case"
                for i, _, _ in pending:
                    results[i].status, results[i].message = (
                        "timeout" if log.timed_out else "not-run"), why
                break
            pending = [e for e in pending if e[0] not in set(started)]
            if pending and log.returncode not in (0, EXIT_CONTEXT_LOST) and not log.timed_out \
                    and all(results[i].status != "crashed" for i in started):
                run.problems.append(f"replay process exited {log.returncode} between cases")
    run.seconds = time.monotonic() - start
    return run


def replay_under_sanitizer(cases: Iterable[Any], tool: str = "memcheck", backend: str = "cuda",
                           bugs: Iterable[str] = (), redzones: bool = True,
                           config: SanitizerConfig | None = None) -> SanitizerRun:
    """Replay `cases` under compute-sanitizer's `tool`, one process for many cases; every
    report mapped to its case and stage. `SanitizerUnavailable` if it cannot run here."""
    return replay_cases(cases, tool, backend, bugs, redzones, config)


_BACKGROUND: ThreadPoolExecutor | None = None


def sanitize_in_background(case_paths: Iterable[str | os.PathLike], tool: str = "memcheck",
                           backend: str = "cuda", bugs: Iterable[str] = (),
                           redzones: bool = False,
                           config: SanitizerConfig | None = None) -> Future[SanitizerRun]:
    """Start `replay_under_sanitizer` on `case_paths` in a separate process, managed from a
    background thread (one at a time, queued); the Future gives the `SanitizerRun` (or raises
    its `SanitizerUnavailable`). For the fuzzer's --sanitizer-every: it keeps fuzzing."""
    global _BACKGROUND
    if _BACKGROUND is None:
        _BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-sanitizer")
    paths = [str(p) for p in case_paths]
    return _BACKGROUND.submit(replay_under_sanitizer, paths, tool, backend, tuple(bugs),
                              redzones, config)
