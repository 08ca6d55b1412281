"""The gate's findings as SARIF 2.1.0, the format GitHub code scanning reads.

One result per finding: `ruleId` its signature "stage:check" (one rule per signature, named by
the check), `level` from its severity (a bug on legal input is an error, one on out-of-contract
input a warning, one behind an injected fault a note), the message with the command that
reproduces it, the minimised reproducer as an attachment (and in `run.artifacts`), and a
location: the stage's kernel in `kernels/*.cu` (the first `__global__` of that stage) for the
built-in targets, the stage method's source for a user's `module:attr` target, else the
reproducer itself. Paths are relative to the repository root (`%SRCROOT%`) where they lie in
it. `properties` keeps what SARIF has no field for: stage, severity, the command, the variants.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

from harness.gate import GateFinding, GateResult
from harness.paths import write_text_atomic

SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
LEVELS = {"legal": "error", "out-of-contract": "warning", "fault": "note"}


def _rel(path: str | os.PathLike, root: Path) -> str:
    """`path` relative to `root` in POSIX form where it lies under it, else a file: URI."""
    p = Path(path)
    absolute = (p if p.is_absolute() else Path.cwd() / p).resolve()
    try:
        return absolute.relative_to(root.resolve()).as_posix()
    except ValueError:
        return absolute.as_uri()


@cache
def kernel_lines(kernel_dir: str) -> dict[str, tuple[str, int]]:
    """stage -> (kernel file, line of its first kernel's name), from the `__global__`
    functions of `kernel_dir/*.cu` (`harness.sanitizer.report.kernel_stages`)."""
    from harness.sanitizer.report import kernel_stages

    table = kernel_stages(Path(kernel_dir))
    found: dict[str, list[tuple[str, int]]] = {}
    for path in sorted(Path(kernel_dir).glob("*.cu")):
        text = path.read_text(encoding="utf-8", errors="replace")
        lines = text.splitlines()
        for name, stage in table.items():
            for m in re.finditer(rf"\b{re.escape(name)}\s*\(", text):
                line = text.count("\n", 0, m.start()) + 1
                if not lines[line - 1].lstrip().startswith(("//", "*", "/*")):  # a comment
                    found.setdefault(stage, []).append((str(path), line))
                    break
    return {stage: min(places) for stage, places in found.items()}


def source_location(target: str, stage: str) -> tuple[Path, int] | None:
    """Where the code of `stage` lives for `target`: the kernel file and line for "cpu" and
    "cuda" (the CPU backend models those kernels), the stage method of a user's target
    class, or None."""
    if target in ("cpu", "cuda"):
        from harness.backends.cuda_build import KERNEL_DIR

        found = kernel_lines(str(KERNEL_DIR)).get(stage)
        return (Path(found[0]), found[1]) if found else None
    try:
        from harness.backends import _lookup  # the object named, not built: no kernels

        obj = _lookup(target)
        cls = obj if isinstance(obj, type) else type(obj)
        method = getattr(cls, stage, None)
        if method is None:
            return None
        _, start = inspect.getsourcelines(method)
        return Path(inspect.getsourcefile(method) or ""), max(start, 1)
    except Exception:  # a location is a help, never a reason to fail the report
        return None


def _location(uri: str, line: int | None = None, message: str | None = None) -> dict[str, Any]:
    phys: dict[str, Any] = {"artifactLocation": {"uri": uri}}
    if not uri.startswith("file:"):
        phys["artifactLocation"]["uriBaseId"] = "%SRCROOT%"
    if line is not None:
        phys["region"] = {"startLine": line}
    loc: dict[str, Any] = {"physicalLocation": phys}
    if message:
        loc["message"] = {"text": message}
    return loc


def _result(f: GateFinding, target: str, root: Path, artifact_index: int) -> dict[str, Any]:
    repro = _rel(f.reproducer, root)
    where = source_location(target, f.stage)
    locations = ([_location(_rel(where[0], root), where[1], f"the {f.stage} stage")]
                 if where else [_location(repro, 1, "the reproducer")])
    text = (f"{f.signature} [{f.severity}]: {f.message}. Reproduce: {f.command}")
    if f.kind == "expectation":
        text = f"corpus expectation not met: {f.message}. Reproduce: {f.command}"
    elif f.kind == "error":
        text = f"corpus file unusable: {f.message}"
    props = {"stage": f.stage, "severity": f.severity, "signature": f.signature,
             "kind": f.kind, "origin": f.origin, "command": f.command, "reproducer": repro,
             "variants": list(f.bugs), "known": f.known}
    if f.ready is not None:
        props["corpusFile"] = _rel(f.ready, root)
    return {
        "ruleId": f.signature, "level": LEVELS.get(f.severity, "error"),
        "message": {"text": text}, "locations": locations,
        "attachments": [{"description": {"text": "the minimised reproducer (corpus JSON)"},
                         "artifactLocation": {"uri": repro, "index": artifact_index,
                                              **({} if repro.startswith("file:") else
                                                 {"uriBaseId": "%SRCROOT%"})}}],
        "partialFingerprints": {"moeHarnessSignature/v1": f"{f.signature}|{'+'.join(f.bugs)}"},
        "properties": props,
    }


def to_sarif(result: GateResult, root: str | os.PathLike = ".") -> dict[str, Any]:
    """The SARIF log (a dict) of a gate run; paths relative to the repository `root`."""
    from importlib import metadata

    root = Path(root)
    try:
        version = metadata.version("moe-harness")
    except metadata.PackageNotFoundError:
        version = "0"
    rules: dict[str, dict[str, Any]] = {}
    artifacts: list[dict[str, Any]] = []
    results = []
    for f in result.findings:
        if f.signature not in rules:
            check = f.signature.split(":", 1)[-1]
            rules[f.signature] = {
                "id": f.signature, "name": check.replace("-", " ").title().replace(" ", ""),
                "shortDescription": {"text": f"{f.stage}: {check}"},
                "fullDescription": {"text": f.message},
                "properties": {"stage": f.stage}}
        uri = _rel(f.reproducer, root)
        index = next((i for i, a in enumerate(artifacts) if a["location"]["uri"] == uri), None)
        if index is None:  # one artifact per file (the schema wants them unique)
            artifacts.append({"location": {"uri": uri}, "roles": ["attachment"],
                              "mimeType": "application/json"})
            index = len(artifacts) - 1
        results.append(_result(f, result.config.target, root, index))
    return {
        "$schema": SCHEMA, "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "moe-harness", "version": version,
                                "rules": list(rules.values())}},
            "originalUriBaseIds": {"%SRCROOT%": {"uri": root.resolve().as_uri() + "/"}},
            "artifacts": artifacts,
            "results": results,
            "invocations": [{"executionSuccessful": True,
                             "properties": {"target": result.config.target,
                                            "budgetSeconds": result.config.seconds,
                                            "seconds": round(result.seconds, 3),
                                            "since": result.config.since,
                                            "focus": list(result.focus)}}],
        }],
    }


def write(result: GateResult, path: str | os.PathLike, root: str | os.PathLike = ".") -> Path:
    return write_text_atomic(path, json.dumps(to_sarif(result, root), indent=2) + "\n")
