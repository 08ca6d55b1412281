"""compute-sanitizer's output as structured reports: its XML (`--xml --save FILE`) and its text.

One `SanitizerReport` per error record: the tool, a stable error kind ("invalid-global-write",
"uninitialized-global-memory-read", "race-write-read", "api-error-cudaErrorLaunchFailure"), the
kernel and the chain stage it belongs to (`kernel_stages()` reads the `__global__` names of
`kernels/*.cu`), access size and address, the nearest allocation and the distance to it, block
and thread, the device source line and the host frames. `case` and `stage` are filled in by
`harness.sanitizer`, which knows what the replay was doing when the record was emitted.

A crashed or killed run leaves a truncated XML file: `parse_xml` keeps every complete record
and says so (`ParsedOutput.truncated`); it never raises on the file's contents.
"""

from __future__ import annotations

import functools
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from harness.chain import STAGES

T = TypeVar("T")
#: kernel source file -> stage, where the file's name is not the stage's
_FILE_STAGE = {"a2a_sanitize": "dispatch", "redzone_selftest": "selftest"}
_GLOBAL_RE = re.compile(
    r"__global__\s+(?:void\s+)?(?:__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)\s*)?"
    r"(?:void\s+)?([A-Za-z_]\w*)\s*\(")
_PREFIX = "========="
_NEAREST_RE = re.compile(r"is ([\d,]+) bytes? (before|after) the nearest allocation at "
                         r"(0x[0-9a-fA-F]+) of size ([\d,]+)")
_ADDRESS_RE = re.compile(r"(?:Address|Access to) (0x[0-9a-fA-F]+)")
_ACCESS_ERROR_RE = re.compile(r"(?:Address|Access to) 0x[0-9a-fA-F]+ is ([a-z ]+?)\s*$")
_PY_FRAME_RE = re.compile(r"^(\S+) in (\S+\.py):(\d+)$")
#: the name the replay gives the Python frame that runs case i (see harness.sanitizer.child)
CASE_FRAME_PREFIX = "moe_harness_case_"
_SIZE_RE = re.compile(r"of size (\d+) bytes?")
_DIM3_RE = re.compile(r"\((\d+),\s*(\d+),\s*(\d+)\)")
_API_RE = re.compile(r"(cuda\w*Error\w*|CUDA_ERROR_\w+)")
#: text lines of compute-sanitizer that say it could not check anything (not error records)
UNAVAILABLE_PHRASES = (
    "device not supported", "unsupported device", "not supported on this device",
    "unable to find injection library", "terminated before first instrumented api call",
    "no cuda-capable device", "cuda driver version is insufficient", "failed to initialize",
)
#: text lines that are neither records nor problems
_SUMMARY_WORDS = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "LEAK SUMMARY", "RACECHECK SUMMARY",
                  "Target application returned", "Warning: Target application returned")


@functools.cache
def kernel_stages(kernel_dir: Path | None = None) -> dict[str, str]:
    """Kernel name -> stage, from the `__global__` functions of `kernels/*.cu`: a kernel
    whose name starts with a stage's name belongs to it (finalize_unpermute_reduce), else the
    file's stage (gating.cu -> gating, a2a_sanitize.cu -> dispatch)."""
    if kernel_dir is None:
        from harness.backends.cuda_build import KERNEL_DIR

        kernel_dir = KERNEL_DIR
    table: dict[str, str] = {}
    for path in sorted(Path(kernel_dir).glob("*.cu")):
        file_stage = _FILE_STAGE.get(path.stem, path.stem)
        for name in _GLOBAL_RE.findall(path.read_text(encoding="utf-8", errors="replace")):
            table[name] = next((s for s in STAGES if name.startswith(s)), file_stage)
    return table


def kernel_base_name(func: str) -> str:
    """The bare name of a (demangled) kernel: "void moe_harness::(anonymous namespace)::
    topk_gating_warp<float>(const float *, ...)" -> "topk_gating_warp"."""
    s = func.strip().replace("(anonymous namespace)", "anon")
    depth, cut = 0, len(s)
    for i, ch in enumerate(s):  # the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "(" and depth == 0:
            cut = i
            break
    head, out, depth = s[:cut], [], 0
    for ch in head:  # drop template arguments
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    name = "".join(out).split()[-1] if "".join(out).split() else s
    return re.sub(r"\+0x[0-9a-fA-F]+$", "", name.split("::")[-1])


def stage_of_kernel(kernel: str | None, table: dict[str, str] | None = None) -> str | None:
    """The chain stage whose kernel this is (None: not one of ours, e.g. a torch kernel)."""
    if not kernel:
        return None
    table = kernel_stages() if table is None else table
    return table.get(kernel_base_name(kernel))


@dataclass(frozen=True)
class Allocation:
    """The allocation nearest a bad address: `distance` bytes `side` ("before"/"after") it."""

    address: int
    size: int
    distance: int
    side: str


@dataclass(frozen=True)
class SanitizerReport:
    """One compute-sanitizer error record.

    `kind` is a stable slug of the record's message (sizes, addresses and names removed);
    `signature` = tool:kind:kernel@stage groups records by root cause. `stage`: the kernel
    table's stage for a kernel of ours, else the stage method in the Python host frames, else
    the replay's markers. `case` is the index of the replayed case (None: not known);
    `mapped_by` says how it was found: "host-frames" (the replay runs case i in a Python frame
    named moe_harness_case_<i>, and compute-sanitizer's host backtraces show Python frames),
    "markers" (the text record came between that case's markers), "single-case" (the only case
    of its process), "device-error" (the case whose stage hit the device error), "none".
    """

    tool: str
    kind: str
    message: str
    record_kind: str = ""
    level: str = "error"
    kernel: str | None = None
    stage: str | None = None
    case: int | None = None
    access_size: int | None = None
    address: int | None = None
    nearest: Allocation | None = None
    block: tuple[int, int, int] | None = None
    thread: tuple[int, int, int] | None = None
    location: str | None = None
    host_frames: tuple[str, ...] = ()
    details: tuple[str, ...] = ()
    mapped_by: str = "none"
    error: str | None = None  # the access error: "out of bounds", "misaligned", ...

    @property
    def signature(self) -> str:
        return f"{self.tool}:{self.kind}:{self.kernel or '-'}@{self.stage or '?'}"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready (addresses as hex strings), for corpus metadata."""
        out: dict[str, Any] = {
            "signature": self.signature, "tool": self.tool, "kind": self.kind,
            "message": self.message, "record_kind": self.record_kind, "level": self.level,
            "kernel": self.kernel, "stage": self.stage, "case": self.case,
            "access_size": self.access_size,
            "address": None if self.address is None else hex(self.address),
            "block": None if self.block is None else list(self.block),
            "thread": None if self.thread is None else list(self.thread),
            "location": self.location, "host_frames": list(self.host_frames[:12]),
            "mapped_by": self.mapped_by, "error": self.error,
        }
        if self.nearest is not None:
            out["nearest_allocation"] = {"address": hex(self.nearest.address),
                                         "size": self.nearest.size,
                                         "distance": self.nearest.distance,
                                         "side": self.nearest.side}
        return out

    def __str__(self) -> str:
        where = f"{self.kernel or '<no kernel>'} (stage {self.stage or '?'}"
        where += f", case {self.case})" if self.case is not None else ")"
        who = f" block {self.block} thread {self.thread}" if self.block else ""
        near = ""
        if self.nearest is not None:
            near = (f"; {self.nearest.distance} bytes {self.nearest.side} an allocation of "
                    f"{self.nearest.size} bytes")
        return f"[{self.tool}] {self.message} in {where}{who}{near}"


@dataclass
class ParsedOutput:
    """What one output file held: the complete records, and whether the file was cut short
    (`truncated`, with `problem` saying where) or not compute-sanitizer's at all."""

    reports: list[SanitizerReport] = field(default_factory=list)
    truncated: bool = False
    problem: str | None = None
    problems: list[str] = field(default_factory=list)  # tool-level errors (text output)
    error_summary: int | None = None  # "ERROR SUMMARY: N errors" (text output)


# -- kinds -------------------------------------------------------------------------------------


def error_kind(message: str, record_kind: str = "", error: str | None = None) -> str:
    """A stable slug of a record's message: what went wrong, without sizes, addresses, names;
    with the access error ("out of bounds", "misaligned") where there is one, so the XML
    ("... of size 4 bytes is out of bounds") and the text ("... of size 4 bytes" and "Access to
    0x.. is out of bounds") give the same kind."""
    text = re.sub(r"^(Error|Warning|Info):\s*", "", message.strip(), flags=re.I)
    if " is " in text and not text.lower().startswith("program hit"):
        text, tail = text.split(" is ", 1)
        error = error or tail
    if record_kind.lower().startswith("api") or text.lower().startswith("program hit"):
        m = _API_RE.search(text)
        return f"api-error-{m.group(1)}" if m else "api-error"
    race = re.findall(r"\b(read|write|atomic)\w* access", text, flags=re.I)
    if "race" in text.lower() and race:
        return "race-" + "-".join(r.lower() for r in race[:2])
    text = re.sub(r"of size \d+ bytes?", "", text)
    text = re.sub(r"\"[^\"]*\"|\([^)]*\)|0x[0-9a-fA-F]+|\d+", " ", text)
    text = text.split(" at ")[0].split(":")[0].replace("__", " ").lower()
    words = re.findall(r"[a-z]+", text)[:8]
    if error:
        words += re.findall(r"[a-z]+", error.lower())[:4]
    return "-".join(words) or "unknown"


def _nearest(text: str) -> Allocation | None:
    m = _NEAREST_RE.search(text)
    if not m:
        return None
    return Allocation(int(m.group(3), 16), int(m.group(4).replace(",", "")),
                      int(m.group(1).replace(",", "")), m.group(2))


# -- XML ---------------------------------------------------------------------------------------


def _tag(el: ET.Element) -> str:
    return el.tag.rsplit("}", 1)[-1].lower()


def _child(el: ET.Element | None, *names: str) -> ET.Element | None:
    if el is None:
        return None
    wanted = {n.lower() for n in names}
    return next((c for c in el if _tag(c) in wanted), None)


def _text(el: ET.Element | None, *path: str) -> str | None:
    for name in path:
        el = _child(el, name)
    return None if el is None or el.text is None else el.text.strip() or None


def _int(s: str | None) -> int | None:
    if s is None:
        return None
    try:
        return int(s, 0)
    except ValueError:
        return None


def _dim3(el: ET.Element | None) -> tuple[int, int, int] | None:
    if el is None:
        return None
    vals = [_int(_text(el, k)) for k in ("x", "y", "z")]
    if all(v is None for v in vals):
        m = _DIM3_RE.search("".join(el.itertext()))
        return (int(m[1]), int(m[2]), int(m[3])) if m else None
    return (vals[0] or 0, vals[1] or 0, vals[2] or 0)


def _frames(stack: ET.Element | None) -> list[tuple[str, str | None, str]]:
    """(function, source path or None, "func in where") of every host frame, innermost first."""
    if stack is None:
        return []
    out = []
    for fr in (c for c in stack if _tag(c) == "frame"):
        func = _text(fr, "func") or _text(fr, "function") or "?"
        path, line, module = _text(fr, "path"), _text(fr, "line"), _text(fr, "module")
        where = f"{Path(path).name}:{line}" if path else (Path(module).name if module else "")
        out.append((func, path, f"{func} in {where}" if where else func))
    return out


def place_from_frames(frames: list[tuple[str, str | None]]) -> tuple[int | None, str | None]:
    """(case, stage) from the Python frames of a host backtrace (innermost first): the case
    from the replay's frame "moe_harness_case_<i>", the stage from the innermost Python frame
    named after a stage (the target method that launched the kernel)."""
    case = stage = None
    for func, path in frames:
        if path is None or not path.endswith(".py"):
            continue
        if stage is None and func in STAGES:
            stage = func
        if case is None and func.startswith(CASE_FRAME_PREFIX):
            suffix = func[len(CASE_FRAME_PREFIX):]
            case = int(suffix) if suffix.isdigit() else None
    return case, stage


def _record_kernel(rec: ET.Element) -> tuple[str | None, str | None]:
    """(kernel, device location) of a record: its `where`, else the first device frame."""
    where = _child(rec, "where")
    func = _text(where, "func")
    path, line = _text(where, "path") or _text(where, "file"), _text(where, "line")
    if func is None:
        for el in rec.iter():
            if _tag(el) == "hoststack":
                continue
            if _tag(el) == "frame" and _text(el, "func") and not _in_host_stack(rec, el):
                func = _text(el, "func")
                path, line = _text(el, "path") or _text(el, "file"), _text(el, "line")
                break
    location = None
    if path:
        location = f"{Path(path).name}:{line}" if line else Path(path).name
    return (kernel_base_name(func) if func else None), location


def _in_host_stack(rec: ET.Element, frame: ET.Element) -> bool:
    return any(frame in list(st.iter()) for st in rec.iter() if _tag(st) == "hoststack")


def record_to_report(rec: ET.Element, tool: str,
                     table: dict[str, str] | None = None) -> SanitizerReport:
    """One `<record>` element as a report (stage from the kernel table; case unknown)."""
    what = _child(rec, "what")
    all_text = " ".join(t.strip() for t in rec.itertext() if t.strip())
    message = (_text(what, "text") or _text(rec, "text") or
               " ".join(t.strip() for t in (what.itertext() if what is not None else ())
                        if t.strip()) or all_text[:200] or "unknown record")
    record_kind = _text(rec, "kind") or ""
    kernel, location = _record_kernel(rec)
    size = _int(_text(what, "size") or _text(what, "accessSize"))
    if size is None and (m := _SIZE_RE.search(message)):
        size = int(m.group(1))
    address = _int(_text(what, "address") or _text(what, "accessAddress")
                   or _text(what, "errorAddress"))
    if address is None and (m := _ADDRESS_RE.search(all_text)):
        address = int(m.group(1), 16)
    nearest = _nearest(all_text)
    base, nsize = _int(_text(what, "nearestAddress")), _int(_text(what, "nearestSize"))
    if nearest is None and base is not None and nsize is not None and address is not None:
        side = "before" if address < base else "after"
        dist = base - address if side == "before" else address - (base + nsize)
        nearest = Allocation(base, nsize, max(dist, 0), side)
    who = _child(rec, "who")
    frames = _frames(next((el for el in rec.iter() if _tag(el) == "hoststack"), None))
    case, frame_stage = place_from_frames([(f, p) for f, p, _ in frames])
    api = record_kind.lower().startswith("api")
    error = None if api else _text(what, "error")
    return SanitizerReport(
        tool=tool, kind=error_kind(message, record_kind, error), message=message,
        record_kind=record_kind, level=(_text(rec, "level") or "error").lower(), kernel=kernel,
        stage=stage_of_kernel(kernel, table) or frame_stage, case=case, access_size=size,
        address=address, nearest=nearest, block=_dim3(_child(who, "blockIdx")),
        thread=_dim3(_child(who, "threadIdx")), location=location,
        host_frames=tuple(w for _, _, w in frames),
        mapped_by="host-frames" if case is not None else "none", error=error)


def parse_xml(source: str | bytes | Path, tool: str,
              table: dict[str, str] | None = None) -> ParsedOutput:
    """Every complete error record of compute-sanitizer's XML (a path or the text itself).

    A file cut short (the application crashed or was killed) keeps the records that were
    complete; `truncated` says so. A missing or empty file is a truncated, empty output."""
    if isinstance(source, Path):
        try:
            data = source.read_bytes()
        except OSError as exc:
            return ParsedOutput(truncated=True, problem=f"{source}: cannot read ({exc})")
    else:
        data = source.encode() if isinstance(source, str) else source
    out = ParsedOutput()
    if not data.strip():
        out.truncated, out.problem = True, "empty output (the run ended before writing it)"
        return out
    parser = ET.XMLPullParser(events=("start", "end"))
    depth = 0
    try:
        parser.feed(data)
        for event, el in parser.read_events():
            depth += 1 if event == "start" else -1
            if event == "end" and depth == 1 and _tag(el) == "record":
                out.reports.append(record_to_report(el, tool, table))
        parser.close()
    except ET.ParseError as exc:
        for event, el in parser.read_events():  # records completed before the error
            depth += 1 if event == "start" else -1
            if event == "end" and depth == 1 and _tag(el) == "record":
                out.reports.append(record_to_report(el, tool, table))
        out.truncated, out.problem = True, f"XML cut short or malformed: {exc}"
    return out


# -- text --------------------------------------------------------------------------------------


def sanitizer_line(line: str) -> str | None:
    """The payload of one line of compute-sanitizer's text output (None: not one of its)."""
    if not line.startswith(_PREFIX):
        return None
    return line[len(_PREFIX):].removeprefix(" ")


def _block_to_report(lines: list[str], tool: str,
                     table: dict[str, str] | None) -> SanitizerReport:
    headline = lines[0].strip()
    level = "error"
    if m := re.match(r"(Error|Warning|Info):\s*", headline, flags=re.I):
        level = m.group(1).lower()
    message = re.sub(r"^(Error|Warning|Info):\s*", "", headline, flags=re.I)
    kernel = location = error = None
    block = thread = None
    frames: list[str] = []
    body = [ln.strip() for ln in lines[1:]]
    for ln in body:
        if ln.startswith("at ") and kernel is None:
            at = ln[3:]
            if m := re.search(r" in ([^ ]+):(\d+)$", at):
                location = f"{Path(m.group(1)).name}:{m.group(2)}"
                at = at[:m.start()]
            at = re.sub(r"^0x[0-9a-fA-F]+ in ", "", at)
            kernel = kernel_base_name(at) if at and not at.startswith("0x") else None
        elif ln.startswith("by thread") and (dims := _DIM3_RE.findall(ln)):
            thread = tuple(map(int, dims[0]))
            block = tuple(map(int, dims[1])) if len(dims) > 1 else None
        elif ln.startswith("Host Frame:"):
            frames.append(ln[len("Host Frame:"):].strip())
        elif error is None and (m := _ACCESS_ERROR_RE.search(ln)):
            error = m.group(1)
    joined = " ".join([headline, *body])
    size = int(m.group(1)) if (m := _SIZE_RE.search(message)) else None
    address = int(m.group(1), 16) if (m := _ADDRESS_RE.search(joined)) else None
    py = [(m.group(1), m.group(2)) for f in frames if (m := _PY_FRAME_RE.match(f))]
    case, frame_stage = place_from_frames(py)
    return SanitizerReport(
        tool=tool, kind=error_kind(message, error=error), message=message, level=level,
        kernel=kernel, stage=stage_of_kernel(kernel, table) or frame_stage, case=case,
        access_size=size, address=address, nearest=_nearest(joined), block=block,
        thread=thread, location=location, host_frames=tuple(frames),
        details=tuple(b for b in body if not b.startswith("Host Frame:"))[:12],
        mapped_by="host-frames" if case is not None else "none", error=error)


def _is_unavailable(line: str) -> bool:
    low = line.lower()
    return any(p in low for p in UNAVAILABLE_PHRASES)


def parse_text_lines(payloads: Iterable[tuple[str, T]], tool: str,
                     table: dict[str, str] | None = None) -> tuple[ParsedOutput, list[T]]:
    """The records of compute-sanitizer's text output given as (payload, tag) pairs: payload
    a line with the prefix removed, tag what the caller knew at that moment (the replay's case
    and stage). A record starts at an unindented line and runs to the next blank or unindented
    one; each report comes with its headline's tag. Tool-level failures go to `problems`."""
    blocks: list[tuple[list[str], T]] = []
    current: list[str] | None = None
    for p, tag in payloads:
        if not p.strip():
            current = None
        elif not p.startswith((" ", "\t")):
            current = [p]
            blocks.append((current, tag))
        elif current is not None:
            current.append(p)
    out, tags = ParsedOutput(), []
    for block, tag in blocks:
        head = block[0].strip()
        if "were not printed" in head:
            out.problems.append(head.removeprefix("ERROR SUMMARY: "))
        elif m := re.match(r"ERROR SUMMARY:\s*(\d+)", head):
            out.error_summary = int(m.group(1))
        elif _is_unavailable(head):
            out.problems.append(head)
        elif not head.startswith(_SUMMARY_WORDS):
            out.reports.append(_block_to_report(block, tool, table))
            tags.append(tag)
    return out, tags


def parse_text(text: str, tool: str, table: dict[str, str] | None = None) -> ParsedOutput:
    """The error records of compute-sanitizer's text output (the lines with its prefix;
    others, the application's own, are ignored)."""
    payloads = ((p, None) for p in (sanitizer_line(ln.rstrip("\r")) for ln in text.splitlines())
                if p is not None)
    return parse_text_lines(payloads, tool, table)[0]


def same_record(xml_message: str, text_message: str) -> bool:
    """Do an XML record and a text record describe the same error (their headlines)?"""
    def norm(s: str) -> str:
        s = re.sub(r"^(Error|Warning|Info):\s*", "", s.strip(), flags=re.I)
        return re.sub(r"\s+", " ", s).lower()

    a, b = norm(xml_message), norm(text_message)
    return bool(a) and bool(b) and (a.startswith(b) or b.startswith(a))


def with_place(report: SanitizerReport, case: int | None, stage: str | None,
               mapped_by: str, twin: SanitizerReport | None = None) -> SanitizerReport:
    """`report` placed at `case`/`stage` unless it knows better (a stage from its kernel or
    host frames, a case from its host frames); `twin`, its text record, adds what the XML
    lacks (the nearest allocation)."""
    known = report.case is not None
    return replace(report, case=report.case if known else case,
                   stage=report.stage or stage,
                   mapped_by=report.mapped_by if known else mapped_by,
                   nearest=report.nearest or (twin.nearest if twin else None),
                   details=report.details or (twin.details if twin else ()))
