"""The corpus: one JSON file per `MoECase`, the only code that reads or writes case files.

Modelled on Hypothesis's `DirectoryBasedExampleDatabase`: a file is named by the content hash
of its case (`<hash>.json`, `content_hash`), written atomically (a temp file in the same
directory, fsync, `os.replace`), so a crash never leaves half a case and saving the same case
twice gives the same file. Nothing is ever pickled.

A file is `{"schema": 1, "case": {...}, "meta": {...}}`, pretty-printed with sorted keys:
- `case` holds every field of `MoECase`. Floats that are NaN/Inf are the strings "nan",
  "inf", "-inf" (so a Patch value NaN given as a float comes back as the equivalent "nan").
  Tensors are `{"dtype", "shape", "data"}` with a flat list (<= 64 elements, written only
  when it round-trips bit-exactly) or `{"dtype", "shape", "b64"}`: base64 of little-endian
  bytes. dtypes: int32, float32, float16, bfloat16. A hand-written file may omit the case's
  optional fields (their defaults apply); `save` writes them all, except `graph_padding` at
  its default "zero" (added later: leaving it out keeps the hashes of older cases).
- `meta` (`CaseMeta`, optional) says where the case came from and what each backend is
  expected to report with which bug variants on.

`load` validates every field and raises one `CorpusError` naming the file and the field
(e.g. "case.faults[2].kind"), then runs `MoECase.validate()` (its `CaseError` becomes a
`CorpusError` on "case.<field>").
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.bugs import VARIANTS
from harness.case import (
    DISTRIBUTIONS,
    FAULT_KINDS,
    FAULT_TENSORS,
    GRAPH_PADDINGS,
    PATCH_TARGETS,
    SCORINGS,
    SPECIAL_VALUES,
    TORCH_DTYPES,
    Fault,
    Generated,
    MoECase,
    Overrides,
    Patch,
    PatchKind,
)
from harness.errors import CaseError, CorpusError
from harness.memory import BITS_DTYPE, bits_view

SCHEMA_VERSION = 1
#: the key of `CaseMeta.extra` that lists the variants a finding was found with
VARIANTS_KEY = "variants"
#: tensors up to this many elements are written as plain lists (when exact), others as base64
LIST_MAX_ELEMENTS = 64
DTYPES: dict[str, torch.dtype] = {
    "int32": torch.int32, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_QUIET_NAN = {torch.float32: 0x7FC00000, torch.float16: 0x7E00, torch.bfloat16: 0x7FC0}
_MAX_ELEMENTS = 2**31
_SIGNATURE = re.compile(r"^[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+$")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class _Bad(Exception):
    """A bad field inside a document; the caller turns it into a `CorpusError` with the path."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


# -- JSON scalars ------------------------------------------------------------------------------


def _kind(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _fields(v: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...]) -> dict:
    """`v` as an object with the `required` keys and no keys beyond `optional`."""
    if not isinstance(v, dict):
        raise _Bad(where or None, f"must be an object, got {_kind(v)}")
    for k in v:
        if k not in required and k not in optional:
            raise _Bad(_join(where, k), f"unknown key (known: {', '.join(required + optional)})")
    for k in required:
        if k not in v:
            raise _Bad(_join(where, k), "missing")
    return v


def _int(v: Any, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise _Bad(where, f"must be an integer, got {_kind(v)} {v!r}")
    return v


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise _Bad(where, f"must be true or false, got {_kind(v)} {v!r}")
    return v


def _str(v: Any, where: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(v, str):
        raise _Bad(where, f"must be a string, got {_kind(v)} {v!r}")
    if choices is not None and v not in choices:
        raise _Bad(where, f"must be one of {', '.join(choices)}; got {v!r}")
    return v


def _float(v: Any, where: str) -> float:
    """A number, or "nan" / "inf" / "-inf"."""
    if isinstance(v, str) and v in _NONFINITE:
        return _NONFINITE[v]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _Bad(where, f"must be a number or one of nan, inf, -inf; got {_kind(v)} {v!r}")
    return float(v)


def _enc_float(x: float) -> float | str:
    x = float(x)
    if math.isnan(x):
        return "nan"
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _list(v: Any, where: str, item: Callable[[Any, str], Any]) -> list:
    if not isinstance(v, list):
        raise _Bad(where, f"must be an array, got {_kind(v)}")
    return [item(x, f"{where}[{i}]") for i, x in enumerate(v)]


def _choice(choices: tuple[str, ...]) -> Callable[[Any, str], str]:
    return lambda v, where: _str(v, where, choices)


# -- tensors -----------------------------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> bytes:
    bits = bits_view(t).view(torch.uint8)
    if sys.byteorder == "big":  # the format is little-endian everywhere
        bits = bits.view(-1, t.element_size()).flip(1).contiguous()
    # the bytes of a contiguous CPU tensor, without needing numpy
    return ctypes.string_at(bits.data_ptr(), bits.numel()) if bits.numel() else b""


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        bits_view(a), bits_view(b))


def tensor_to_json(t: torch.Tensor, where: str = "tensor") -> dict[str, Any]:
    """A tensor as JSON: a flat list when small and exact, else base64 of little-endian bytes."""
    t = t.detach().cpu()
    if t.dtype not in _DTYPE_NAMES:
        raise _Bad(f"{where}.dtype", f"cannot store dtype {t.dtype} (stored dtypes: "
                                     f"{', '.join(DTYPES)})")
    out: dict[str, Any] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
    if t.numel() <= LIST_MAX_ELEMENTS:
        if t.dtype == torch.int32:
            data: list = t.flatten().tolist()
        else:
            data = [_enc_float(x) for x in t.flatten().double().tolist()]
        if _same_bits(_tensor_from_list(data, t.dtype, tuple(t.shape), where), t):
            out["data"] = data  # NaN payloads and the sign of NaN only survive as bytes
            return out
    out["b64"] = base64.b64encode(_tensor_bytes(t)).decode("ascii")
    return out


def _tensor_from_list(data: list, dtype: torch.dtype, shape: tuple[int, ...],
                      where: str) -> torch.Tensor:
    if dtype == torch.int32:
        values = _list(data, f"{where}.data", _int)
        for i, x in enumerate(values):
            if not -2**31 <= x < 2**31:
                raise _Bad(f"{where}.data[{i}]", f"{x} does not fit in int32")
        return torch.tensor(values, dtype=torch.int64).to(torch.int32).reshape(shape)
    values = torch.tensor(_list(data, f"{where}.data", _float), dtype=torch.float64)
    out = values.to(dtype)
    # "nan" is the positive quiet NaN; torch's conversions pick NaN bits by code path
    out.view(BITS_DTYPE[out.element_size()])[values.isnan()] = _QUIET_NAN[dtype]
    return out.reshape(shape)


def tensor_from_json(v: Any, where: str = "tensor") -> torch.Tensor:
    """The inverse of `tensor_to_json`; `_Bad` on a bad dtype, shape, list or byte length."""
    obj = _fields(v, where, ("dtype", "shape"), ("data", "b64"))
    dtype = DTYPES[_str(obj["dtype"], f"{where}.dtype", tuple(DTYPES))]
    shape = tuple(_list(obj["shape"], f"{where}.shape", _int))
    if any(d < 0 for d in shape):
        raise _Bad(f"{where}.shape", f"dimensions must be >= 0, got {list(shape)}")
    numel = math.prod(shape)
    if numel > _MAX_ELEMENTS:
        raise _Bad(f"{where}.shape", f"{numel} elements is more than a case can hold")
    if ("data" in obj) == ("b64" in obj):
        raise _Bad(where, "needs exactly one of 'data' (a list) or 'b64' (base64 bytes)")
    if "data" in obj:
        if not isinstance(obj["data"], list) or len(obj["data"]) != numel:
            got = len(obj["data"]) if isinstance(obj["data"], list) else _kind(obj["data"])
            raise _Bad(f"{where}.data", f"must be a flat array of {numel} values for shape "
                                        f"{list(shape)}, got {got}")
        return _tensor_from_list(obj["data"], dtype, shape, where)
    text = _str(obj["b64"], f"{where}.b64")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise _Bad(f"{where}.b64", f"not valid base64: {exc}") from None
    size = dtype.itemsize
    if len(raw) != numel * size:
        raise _Bad(f"{where}.b64", f"{len(raw)} bytes, but shape {list(shape)} of {obj['dtype']}"
                                   f" needs {numel * size}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    bits = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if sys.byteorder == "big":
        bits = bits.view(-1, size).flip(1).contiguous().flatten()
    return bits.view(BITS_DTYPE[size]).view(dtype).reshape(shape).clone()


# -- the case ----------------------------------------------------------------------------------

_PATCH_KINDS = typing.get_args(PatchKind)


def _patch_value(v: Any, where: str) -> float | str:
    if isinstance(v, str) and v in SPECIAL_VALUES:
        return v
    try:
        return _float(v, where)
    except _Bad:
        raise _Bad(where, f"must be a number or one of {', '.join(SPECIAL_VALUES)}; got {v!r}"
                   ) from None


def _rows(v: Any, where: str) -> tuple[int, ...]:
    return tuple(_list(v, where, _int))


def _enc_value(v: float | str) -> float | str:
    return v if isinstance(v, str) else _enc_float(v)


def _same(v: Any) -> Any:
    return v


#: per record type: field -> (decode, encode)
_RECORDS: dict[type, dict[str, tuple[Callable[[Any, str], Any], Callable[[Any], Any]]]] = {
    Generated: {"seed": (_int, _same), "distribution": (_choice(DISTRIBUTIONS), _same),
                "scale": (_float, _enc_float)},
    Patch: {"target": (_choice(PATCH_TARGETS), _same), "kind": (_choice(_PATCH_KINDS), _same),
            "value": (_patch_value, _enc_value), "row": (_int, _same), "col": (_int, _same)},
    Fault: {"boundary": (_choice(tuple(FAULT_TENSORS)), _same), "tensor": (_str, _same),
            "kind": (_choice(FAULT_KINDS), _same), "rows": (_rows, list),
            "fraction": (_float, _enc_float), "seed": (_int, _same), "bit": (_int, _same)},
}


def _record_to_json(obj: Any) -> dict[str, Any]:
    return {name: enc(getattr(obj, name)) for name, (_, enc) in _RECORDS[type(obj)].items()}


def _record_from_json(cls: type, v: Any, where: str) -> Any:
    spec = _RECORDS[cls]
    obj = _fields(v, where, (), tuple(spec))
    return cls(**{k: spec[k][0](x, f"{where}.{k}") for k, x in obj.items()})


def _fault(v: Any, where: str) -> Fault:
    f = _record_from_json(Fault, v, where)
    tensors = tuple(FAULT_TENSORS[f.boundary])
    _str(f.tensor, f"{where}.tensor", tensors)
    return f


def _source_to_json(src: Generated | torch.Tensor | None, where: str) -> dict | None:
    if src is None:
        return None
    if isinstance(src, torch.Tensor):
        return {"tensor": tensor_to_json(src, f"{where}.tensor")}
    return {"generated": _record_to_json(src)}


def _source_from_json(v: Any, where: str) -> Generated | torch.Tensor:
    obj = _fields(v, where, (), ("generated", "tensor"))
    if len(obj) != 1:
        raise _Bad(where, "needs exactly one of 'generated' or 'tensor'")
    if "tensor" in obj:
        return tensor_from_json(obj["tensor"], f"{where}.tensor")
    return _record_from_json(Generated, obj["generated"], f"{where}.generated")


def _overrides_from_json(v: Any, where: str) -> Overrides:
    names = tuple(f.name for f in dataclasses.fields(Overrides))
    obj = _fields(v, where, (), names)
    return Overrides(**{k: tensor_from_json(x, f"{where}.{k}") for k, x in obj.items()})


def _optional(item: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    return lambda v, where: None if v is None else item(v, where)


def _tuple_of(item: Callable[[Any, str], Any]) -> Callable[[Any, str], tuple]:
    return lambda v, where: tuple(_list(v, where, item))


_CASE_DECODE: dict[str, Callable[[Any, str], Any]] = {
    "num_tokens": _int, "num_experts": _int, "topk": _int, "scoring": _choice(SCORINGS),
    "renormalize": _bool, "dtype": _choice(tuple(TORCH_DTYPES)), "hidden_size": _int,
    "block_size": _int, "seed": _int, "logits": _source_from_json,
    "correction_bias": _optional(_source_from_json),
    "patches": _tuple_of(lambda v, w: _record_from_json(Patch, v, w)),
    "ep_size": _int, "max_tokens_per_rank": _optional(_int),
    "expert_to_rank": _optional(_tuple_of(_int)), "max_loras": _int,
    "adapter_enabled": _optional(_tuple_of(_bool)), "overrides": _overrides_from_json,
    "faults": _tuple_of(_fault),
    "graph_padding": _choice(GRAPH_PADDINGS),
}
_CASE_REQUIRED = ("num_tokens", "num_experts", "topk")
#: optional fields written only away from their default, so adding one kept old hashes
_OMIT_AT_DEFAULT = {"graph_padding": "zero"}


def _case_error(err: CaseError, path: str) -> CorpusError:
    message = str(err).removeprefix(f"case field '{err.field}': ")
    return CorpusError(path, message, f"case.{err.field}")


def case_to_json(case: MoECase) -> dict[str, Any]:
    """Every field of a valid `case` as JSON (`CorpusError` on "<memory>" if it is invalid)."""
    try:
        case.validate()
        out = {name: getattr(case, name) for name in _CASE_DECODE}
        out.update(
            logits=_source_to_json(case.logits, "case.logits"),
            correction_bias=_source_to_json(case.correction_bias, "case.correction_bias"),
            patches=[_record_to_json(p) for p in case.patches],
            expert_to_rank=None if case.expert_to_rank is None else list(case.expert_to_rank),
            adapter_enabled=(None if case.adapter_enabled is None
                             else list(case.adapter_enabled)),
            overrides={k: tensor_to_json(t, f"case.overrides.{k}")
                       for k, t in case.overrides.fields().items()},
            faults=[_record_to_json(f) for f in case.faults],
        )
        for name, default in _OMIT_AT_DEFAULT.items():
            if out[name] == default:
                del out[name]
    except CaseError as exc:
        raise _case_error(exc, "<memory>") from None
    except _Bad as exc:
        raise CorpusError("<memory>", exc.message, exc.field) from None
    case_from_json(out)  # field types validate() does not check (renormalize=1, ...)
    return out


def case_from_json(obj: Any, path: str = "<memory>") -> MoECase:
    """The `MoECase` of a document's "case" object, validated; `CorpusError` naming `path`."""
    try:
        fields_ = _fields(obj, "case", _CASE_REQUIRED, tuple(_CASE_DECODE))
        case = MoECase(**{k: _CASE_DECODE[k](v, f"case.{k}") for k, v in fields_.items()})
        return case.validate()
    except _Bad as exc:
        raise CorpusError(path, exc.message, exc.field) from None
    except CaseError as exc:
        raise _case_error(exc, path) from None


def content_hash(case: MoECase) -> str:
    """16 hex digits of the sha256 of the case's canonical JSON (sorted keys, no spaces)."""
    return _hash(case_to_json(case))


def _hash(case_json: dict[str, Any]) -> str:
    text = json.dumps(case_json, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# -- metadata ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expectation:
    """What `backend` (None: any) reports on this case with the variants `bugs` on.

    `outcome` is "clean" or a finding signature ("gating:unique-ids").
    """

    backend: str | None = None
    bugs: tuple[str, ...] = ()
    outcome: str = "clean"

    def __post_init__(self) -> None:  # a set of variants: one canonical spelling
        bugs = (self.bugs,) if isinstance(self.bugs, str) else self.bugs
        object.__setattr__(self, "bugs", tuple(sorted(set(bugs))))


@dataclass(frozen=True)
class CaseMeta:
    """Where a case came from and what it should produce; `extra` is free-form JSON
    (time or executions to find, seeds, ...)."""

    origin: str = "hand"
    signature: str | None = None
    expect: tuple[Expectation, ...] = ()
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def expected(self, backend: str, bugs: tuple[str, ...] | list[str] = ()) -> str | None:
        """The expected outcome for `backend` with exactly `bugs` on (None: no expectation);
        an expectation for this backend wins over one for any backend."""
        key = tuple(sorted(set(bugs)))
        hits = {e.backend: e.outcome for e in self.expect if e.bugs == key}
        return hits.get(backend, hits.get(None))

    def found_with(self) -> tuple[str, ...]:
        """The variant set the case's finding was found with (empty: the fixed chain): its
        expectation of its own signature, else `extra["variants"]` as the findings store and
        the fuzzer's sanitizer write it."""
        for e in self.expect:
            if e.outcome != "clean" and (self.signature is None or e.outcome == self.signature):
                return e.bugs
        variants = self.extra.get(VARIANTS_KEY)
        if isinstance(variants, list) and all(isinstance(b, str) for b in variants):
            return tuple(sorted(variants))
        return ()

    def merged(self, newer: CaseMeta) -> CaseMeta:
        """`newer` wins; expectations (per backend and variant set) and `extra` are unioned,
        and an empty note or signature in `newer` keeps the older one."""
        expect = {(e.backend, e.bugs): e for e in self.expect + newer.expect}
        return CaseMeta(origin=newer.origin, signature=newer.signature or self.signature,
                        expect=tuple(expect.values()), note=newer.note or self.note,
                        extra={**self.extra, **newer.extra})


def _signature(v: Any, where: str) -> str:
    s = _str(v, where)
    if not _SIGNATURE.match(s):
        raise _Bad(where, f"must be a finding signature 'stage:check', got {s!r}")
    return s


def _outcome(v: Any, where: str) -> str:
    return "clean" if v == "clean" else _signature(v, where)


def _variant(v: Any, where: str) -> str:
    name = _str(v, where)
    if name not in VARIANTS:
        raise _Bad(where, f"unknown bug variant {name!r} (known: {', '.join(sorted(VARIANTS))})")
    return name


def _backend(v: Any, where: str) -> str | None:
    if v is not None and not (isinstance(v, str) and v):
        raise _Bad(where, f"must be a backend name or null (any backend), got {v!r}")
    return v


def _expectation(v: Any, where: str) -> Expectation:
    obj = _fields(v, where, ("outcome",), ("backend", "bugs"))
    return Expectation(backend=_backend(obj.get("backend"), f"{where}.backend"),
                       bugs=tuple(_list(obj.get("bugs", []), f"{where}.bugs", _variant)),
                       outcome=_outcome(obj["outcome"], f"{where}.outcome"))


def _json_only(v: Any, where: str) -> None:
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise _Bad(where, f"keys must be strings, got {k!r}")
            _json_only(x, f"{where}.{k}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _json_only(x, f"{where}[{i}]")
    elif isinstance(v, float) and not math.isfinite(v):
        raise _Bad(where, f"must be a finite number, got {v!r}")
    elif v is not None and not isinstance(v, str | int | float | bool):
        raise _Bad(where, f"must be JSON (object, array, string, number, bool, null), got {v!r}")


def meta_from_json(v: Any, where: str = "meta") -> CaseMeta:
    obj = _fields(v, where, (), ("origin", "signature", "expect", "note", "extra"))
    origin = _str(obj.get("origin", "hand"), f"{where}.origin")
    if not origin:
        raise _Bad(f"{where}.origin", "must not be empty")
    signature = _optional(_signature)(obj.get("signature"), f"{where}.signature")
    expect = _list(obj.get("expect", []), f"{where}.expect", _expectation)
    seen: dict[tuple, int] = {}
    for i, e in enumerate(expect):
        if (e.backend, e.bugs) in seen:
            first = seen[e.backend, e.bugs]
            raise _Bad(f"{where}.expect[{i}]", f"same backend and bugs as expect[{first}]")
        seen[e.backend, e.bugs] = i
    extra = obj.get("extra", {})
    if not isinstance(extra, dict):
        raise _Bad(f"{where}.extra", f"must be an object, got {_kind(extra)}")
    _json_only(extra, f"{where}.extra")
    return CaseMeta(origin=origin, signature=signature, expect=tuple(expect),
                    note=_str(obj.get("note", ""), f"{where}.note"), extra=dict(extra))


def meta_to_json(meta: CaseMeta) -> dict[str, Any]:
    out = {"origin": meta.origin, "signature": meta.signature, "note": meta.note,
           "extra": meta.extra,
           "expect": [{"backend": e.backend, "bugs": list(e.bugs), "outcome": e.outcome}
                      for e in meta.expect]}
    try:
        meta_from_json(out)  # the checks a reader will make: never write what cannot be read
    except _Bad as exc:
        raise CorpusError("<memory>", exc.message, exc.field) from None
    return out


# -- documents and files -----------------------------------------------------------------------


def _pretty(v: Any, indent: int = 0) -> str:
    """JSON with sorted keys, one entry per line, except that arrays of scalars and small flat
    objects (a patch, a fault, a small tensor) stay on one line: short and diff-friendly."""
    def flat() -> str:
        return json.dumps(v, sort_keys=True, allow_nan=False, separators=(", ", ": "))

    if not isinstance(v, dict | list) or not v:
        return flat()
    nested = any(isinstance(x, dict) or (isinstance(x, list) and isinstance(v, list))
                 for x in (v.values() if isinstance(v, dict) else v))
    if not nested and (isinstance(v, list) or (indent >= 2 and len(flat()) + 2 * indent <= 100)):
        return flat()
    pad = "  " * (indent + 1)
    items = ([f"{pad}{json.dumps(k)}: {_pretty(v[k], indent + 1)}" for k in sorted(v)]
             if isinstance(v, dict) else [pad + _pretty(x, indent + 1) for x in v])
    brackets = "{}" if isinstance(v, dict) else "[]"
    return brackets[0] + "\n" + ",\n".join(items) + "\n" + "  " * indent + brackets[1]


def dumps(case: MoECase, meta: CaseMeta | None = None) -> str:
    """A case file's text (what `save` writes)."""
    doc = {"schema": SCHEMA_VERSION, "case": case_to_json(case),
           "meta": meta_to_json(meta or CaseMeta())}
    return _pretty(doc) + "\n"


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _no_constants(name: str) -> None:
    raise _Bad(None, f"bare {name} is not JSON; write the string \"{name.lower()}\"")


def loads(text: str, path: str = "<memory>") -> tuple[MoECase, CaseMeta]:
    """Parse and validate a case file's text; `CorpusError` naming `path` and the field."""
    if not text.strip():
        raise CorpusError(path, "empty file (expected a JSON object)")
    try:
        doc = json.loads(text, parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise CorpusError(path, f"not valid JSON: {exc.msg} (line {exc.lineno}, column "
                                f"{exc.colno})") from None
    except _DuplicateKey as exc:
        raise CorpusError(path, f"not valid JSON: key {exc.args[0]!r} appears twice") from None
    except _Bad as exc:
        raise CorpusError(path, exc.message, exc.field) from None
    if not isinstance(doc, dict):
        raise CorpusError(path, f"must be a JSON object with 'schema' and 'case', "
                                f"got {_kind(doc)}")
    if "schema" not in doc:
        raise CorpusError(path, "missing (is this a moe-harness case file?)", "schema")
    version = doc["schema"]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise CorpusError(path, f"unsupported schema version {version!r} (this harness reads "
                                f"{SCHEMA_VERSION})", "schema")
    try:
        _fields(doc, "", ("schema", "case"), ("meta",))
        case = case_from_json(doc["case"], path)
        return case, meta_from_json(doc.get("meta", {}))
    except _Bad as exc:
        raise CorpusError(path, exc.message, exc.field) from None


def load(path: str | os.PathLike) -> tuple[MoECase, CaseMeta]:
    """Read one case file; `CorpusError` naming the file (and field) for any problem."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise CorpusError(name, "no such file") from None
    except OSError as exc:
        raise CorpusError(name, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(name, f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    return loads(text, name)


def _atomic_write(path: Path, text: str) -> None:
    """Temp file in the same directory, fsync, rename: readers see the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save(case: MoECase, directory: str | os.PathLike, meta: CaseMeta | None = None) -> Path:
    """Write `case` as `<directory>/<content_hash>.json`, atomically; return the path.

    Idempotent: the same case always goes to the same file. If it exists, `meta` is merged
    into its metadata (`CaseMeta.merged`); `meta=None` keeps the existing metadata. A file
    whose text would not change is not rewritten.
    """
    case_json = case_to_json(case)
    path = Path(directory) / f"{_hash(case_json)}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where the directory should be, a read-only mount
        raise CorpusError(str(directory), f"cannot write a case here: "
                                          f"{exc.strerror or exc}") from None
    old_text = None
    if path.exists():
        try:
            old_text = path.read_text(encoding="utf-8")
            _, old_meta = loads(old_text, str(path))
            meta = old_meta if meta is None else old_meta.merged(meta)
        except (CorpusError, OSError, UnicodeDecodeError):
            pass  # a corrupt file under our name: replaced by the case it should hold
    doc = {"schema": SCHEMA_VERSION, "case": case_json, "meta": meta_to_json(meta or CaseMeta())}
    text = _pretty(doc) + "\n"
    if text != old_text:
        try:
            _atomic_write(path, text)
        except OSError as exc:
            raise CorpusError(str(path), f"cannot write: {exc.strerror or exc}") from None
    return path


def iter_corpus(directory: str | os.PathLike) -> Iterator[Path]:
    """The case files under `directory` (recursive, sorted; hidden files and temp files
    skipped); a single .json file yields itself, a missing directory nothing."""
    root = Path(directory)
    if root.is_file():
        if root.suffix != ".json":
            raise CorpusError(str(root), "not a corpus directory or a .json case file")
        yield root
        return
    if not root.exists():
        return
    for p in sorted(root.rglob("*.json")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts):
            yield p


def check_corpus(directory: str | os.PathLike) -> list[CorpusError]:
    """Every problem in a corpus: unloadable files, names that are not the content hash,
    and duplicates (two files holding the same case)."""
    errors: list[CorpusError] = []
    seen: dict[str, Path] = {}
    for path in iter_corpus(directory):
        try:
            case, _ = load(path)
        except CorpusError as exc:
            errors.append(exc)
            continue
        h = content_hash(case)
        if path.stem != h:
            errors.append(CorpusError(str(path), f"file name does not match the content hash "
                                                 f"{h} (save() names files {h}.json)"))
        if h in seen:
            errors.append(CorpusError(str(path), f"duplicate of {seen[h]} (content hash {h})"))
        else:
            seen[h] = path
    return errors
