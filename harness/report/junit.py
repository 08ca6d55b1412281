"""The gate as JUnit XML: CI systems show each corpus case and each fuzz segment as a test.

Two suites: "corpus" (a test per case file, named by its path; a failure carries the replay's
report: expected vs got, the offending rows beside the oracle's, the command) and "fuzz" (a test
per segment, named by its stages; a failure per finding with its reproducer and command; a
segment that did not run is skipped with the reason).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from harness.gate import GateResult
from harness.paths import write_text_atomic


def _suite(parent: ET.Element, name: str, cases: list[ET.Element], seconds: float) -> None:
    suite = ET.SubElement(parent, "testsuite", name=name, tests=str(len(cases)),
                          failures=str(sum(c.find("failure") is not None for c in cases)),
                          errors=str(sum(c.find("error") is not None for c in cases)),
                          skipped=str(sum(c.find("skipped") is not None for c in cases)),
                          time=f"{seconds:.3f}")
    suite.extend(cases)


def to_xml(result: GateResult) -> ET.Element:
    """The `<testsuites>` element of a gate run."""
    root = ET.Element("testsuites", name="moe-harness gate")
    corpus_cases = []
    for c in result.corpus:
        tc = ET.Element("testcase", classname="moe-harness.corpus", name=str(c.path),
                        file=str(c.path), time=f"{c.seconds:.3f}")
        if c.error is not None:
            ET.SubElement(tc, "error", message=c.error, type="unreadable").text = c.error
        elif not c.ok:
            first = c.report.splitlines()[0] if c.report else "expectation not met"
            ET.SubElement(tc, "failure", message=first, type="expectation").text = c.report
        corpus_cases.append(tc)
    _suite(root, "corpus", corpus_cases, sum(c.seconds for c in result.corpus))

    fuzz_cases = []
    fuzz_findings = [f for f in result.findings if f.origin == "fuzz"]
    for seg in result.segments:
        tc = ET.Element("testcase", classname="moe-harness.fuzz", name=f"fuzz {seg.name}",
                        time=f"{seg.seconds:.3f}")
        if not seg.executions:
            ET.SubElement(tc, "skipped", message=seg.reason)
        else:
            for f in (f for f in fuzz_findings if f.signature in seg.found):
                text = (f"{f.signature} [{f.severity}]: {f.message}\nreproducer: {f.reproducer}"
                        f"\nreproduce: {f.command}")
                ET.SubElement(tc, "failure", message=f"{f.signature}: {f.message}",
                              type=f.signature).text = text
        ET.SubElement(tc, "system-out").text = (
            f"{seg.executions} executions in {seg.seconds:.1f} s from {seg.seeds} seed(s); "
            f"coverage {seg.coverage}, features {seg.features}; stopped: {seg.reason}")
        fuzz_cases.append(tc)
    for note in result.notes:
        if note.startswith("fuzzing skipped"):
            tc = ET.Element("testcase", classname="moe-harness.fuzz", name="fuzz", time="0")
            ET.SubElement(tc, "skipped", message=note)
            fuzz_cases.append(tc)
    _suite(root, "fuzz", fuzz_cases, sum(s.seconds for s in result.segments))
    for attr in ("tests", "failures", "errors", "skipped"):
        root.set(attr, str(sum(int(s.get(attr, "0")) for s in root)))
    root.set("time", f"{result.seconds:.3f}")
    return root


def write(result: GateResult, path: str | os.PathLike) -> Path:
    root = to_xml(result)
    ET.indent(root)
    text = '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, "unicode") + "\n"
    return write_text_atomic(path, text)
