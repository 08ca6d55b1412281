"""The replay process `harness.sanitizer.run` starts (under compute-sanitizer, or bare): many
cases, one process, launch markers on stdout.

`python -m harness.sanitizer.child MANIFEST.json`, where the manifest (written by
`harness.sanitizer.run`) names the cases (index, path, optionally the case's own bug variants),
the backend, the bug variants and whether the cuda backend's redzones and poison are on.
Before each case and around each stage the process prints one marker line,
`@@moe-harness {json}`, flushed, so the parent can tell which case and stage were running when
compute-sanitizer printed a record; each stage is also an NVTX range
"moe-harness:<case>:<stage>" (seen by Nsight tools). And case i runs inside a Python function
named `moe_harness_case_<i>`: compute-sanitizer's host backtraces include Python frames by
name, so every record names its case even where its text is not interleaved with the markers.

Without poison (the cuda backend with checks off) the invariants that read poison
(`POISON_CHECKS`) see whatever the allocator left in never-written memory: their findings are
reported apart ("set_aside"), not as the case's findings.

Exit codes: 0 every case ran, 3 the CUDA context was lost (the parent restarts after that
case), 4 the backend cannot run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness.backends import resolve_target
from harness.chain.target import StageHooks, Target
from harness.sanitizer.report import CASE_FRAME_PREFIX

MARKER = "@@moe-harness "
EXIT_CONTEXT_LOST = 3
EXIT_UNAVAILABLE = 4
#: invariant checks that tell never-written memory by its poison pattern (harness.memory):
#: sort_align/lora_align "no-poison" (a row that must be written holds poison) and lora_align
#: "disabled-untouched" (a skipped adapter's row is not all poison). Without poison an untouched
#: buffer holds whatever the allocator returns, so they give artefacts (on an H200:
#: lora_align:disabled-untouched on the seed with a disabled adapter) or nothing, no verdict.
POISON_CHECKS = frozenset({"no-poison", "disabled-untouched"})


def emit(event: str, **fields: Any) -> None:
    """One marker line on stdout, flushed before anything else happens."""
    sys.stdout.write(MARKER + json.dumps({"ev": event, "t": time.time(), **fields}) + "\n")
    sys.stdout.flush()


class _Nvtx:
    """NVTX ranges where torch has them (a CUDA build); nothing elsewhere."""

    def __init__(self) -> None:
        self.on = True

    def push(self, name: str) -> None:
        if self.on:
            try:
                import torch

                torch.cuda.nvtx.range_push(name)
            except Exception:  # a CPU build of torch has no NVTX: markers alone
                self.on = False

    def pop(self) -> None:
        if self.on:
            try:
                import torch

                torch.cuda.nvtx.range_pop()
            except Exception:
                self.on = False


class MarkedTarget(StageHooks):
    """`inner` with a marker (and an NVTX range) around every stage it runs."""

    def __init__(self, inner: Target, marker: Callable[..., None] = emit) -> None:
        super().__init__(inner)
        self.case = -1
        self.marker = marker
        self.nvtx = _Nvtx()

    @contextlib.contextmanager
    def around(self, stage: str) -> Iterator[None]:
        self.marker("stage", i=self.case, stage=stage)
        self.nvtx.push(f"moe-harness:{self.case}:{stage}")
        try:
            yield
        finally:
            self.nvtx.pop()
            self.marker("stage-end", i=self.case, stage=stage)


def _run_case(case, target, bugs):
    from harness.api import execute

    return execute(case, target, bugs)


def case_runner(i: int) -> Callable:
    """`execute` inside a frame whose code is named moe_harness_case_<i> (see the module doc)."""
    name = f"{CASE_FRAME_PREFIX}{i}"
    code = _run_case.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, _run_case.__globals__, name)


def split_findings(findings: list[dict[str, Any]],
                   poisoned: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(findings, set aside): with `poisoned` False, those of `POISON_CHECKS` are set aside."""
    if poisoned:
        return findings, []
    keep = [f for f in findings if f.get("check") not in POISON_CHECKS]
    return keep, [f for f in findings if f.get("check") in POISON_CHECKS]


def replay(manifest: dict[str, Any]) -> int:
    """Run the manifest's cases in order, with markers; the exit code (see the module doc)."""
    from harness import corpus
    from harness.bugs import BugSet
    from harness.errors import BackendUnavailable, HarnessError

    emit("start", pid=os.getpid())
    try:
        bugs = BugSet.of(manifest.get("bugs", []))
        inner = resolve_target(manifest.get("backend", "cuda"), coverage=False,
                               checks=bool(manifest.get("checks", True)))
    except HarnessError as exc:
        emit("unavailable", message=str(exc))
        return EXIT_UNAVAILABLE
    target = MarkedTarget(inner)
    poisoned = inner.checks  # the cpu backend always poisons
    for entry in manifest["cases"]:
        i = int(entry["index"])
        target.case = i
        emit("case", i=i, path=entry["path"])
        start = time.perf_counter()
        try:
            case, _ = corpus.load(entry["path"])
            case_bugs = bugs if entry.get("bugs") is None else BugSet.of(entry["bugs"])
            result = case_runner(i)(case, target, case_bugs)
        except HarnessError as exc:
            emit("case-error", i=i, message=str(exc))
            continue
        findings, set_aside = split_findings([f.to_json() for f in result.findings], poisoned)
        emit("case-end", i=i, seconds=time.perf_counter() - start, findings=findings,
             set_aside=set_aside,
             rejected=None if result.rejected is None else str(result.rejected))
        try:
            inner.check_usable()
        except BackendUnavailable as exc:
            emit("context-lost", i=i, message=str(exc))
            sys.stderr.flush()
            # skip interpreter teardown: it would call into the dead context again
            os._exit(EXIT_CONTEXT_LOST)
    emit("done")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m harness.sanitizer.child MANIFEST.json", file=sys.stderr)
        return 2
    return replay(json.loads(Path(args[0]).read_text(encoding="utf-8")))


if __name__ == "__main__":
    sys.exit(main())
