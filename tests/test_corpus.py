"""Tests of harness/corpus.py: the case file format, atomic writes, validation, corpus checks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness import corpus
from harness.case import (
    FAULT_KINDS,
    FAULT_TENSORS,
    PATCH_TARGETS,
    SPECIAL_VALUES,
    Fault,
    Generated,
    MoECase,
    Overrides,
    Patch,
    materialize,
)
from harness.corpus.format import CaseMeta, Expectation
from harness.errors import CorpusError

# -- helpers -----------------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor: NaN == NaN, -0.0 != 0.0."""
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def norm_value(v: float | str) -> float | str:
    """A patch value as the format stores it: a non-finite float as its string."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def assert_same_case(a: MoECase, b: MoECase) -> None:
    """Field by field, independently of the corpus code: tensors compared bit for bit."""
    for f in dataclasses.fields(MoECase):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert same_tensor(x, y), f.name
        elif f.name == "overrides":
            assert x.fields().keys() == y.fields().keys()
            for k, t in x.fields().items():
                assert same_tensor(t, y.fields()[k]), f"overrides.{k}"
        elif f.name == "patches":
            assert [dataclasses.replace(p, value=norm_value(p.value)) for p in x] == list(y)
        else:
            assert x == y, f.name


def assert_same_materialized(a: MoECase, b: MoECase) -> None:
    ma, mb = materialize(a), materialize(b)
    for f in dataclasses.fields(ma):
        assert same_tensor(getattr(ma, f.name), getattr(mb, f.name)), f.name


def rich_case() -> MoECase:
    """Every field of MoECase away from its default, with special values everywhere."""
    T, E, K = 6, 8, 3
    logits = torch.linspace(-4, 4, T * E).reshape(T, E).to(torch.bfloat16)
    logits[0, 1], logits[2, 3], logits[4, 0], logits[5, 5] = math.nan, math.inf, -math.inf, -0.0
    return MoECase(
        num_tokens=T, num_experts=E, topk=K, scoring="sigmoid", renormalize=True, dtype="bf16",
        hidden_size=4, block_size=4, seed=7, logits=logits,
        correction_bias=Generated(seed=3, distribution="uniform", scale=0.5),
        patches=(*(Patch(target="gating_logits", kind="cell", value=v, row=i, col=i + 1)
                   for i, v in enumerate(SPECIAL_VALUES)),
                 Patch("hidden_states", "row", -1.5, row=2), Patch("correction_bias", "all", 1e-3),
                 Patch("gating_logits", "column", math.nan, col=7)),
        ep_size=2, max_tokens_per_rank=5, expert_to_rank=(1, 0, 1, 0, 0, 1, 1, 0),
        max_loras=3, adapter_enabled=(True, False, True),
        overrides=Overrides(
            gating_logits=torch.full((T, E), 0.25),
            topk_ids=torch.tensor([[0, 1, 2], [-1, 7, 8], [3, 3, 3], [-2**31, 2**31 - 1, 0],
                                   [5, 6, 7], [1, 0, -5]], dtype=torch.int32),
            topk_weights=torch.tensor([[0.5, math.nan, -math.inf]] * T, dtype=torch.float16),
            recv_counters=torch.tensor([[3, -1], [0, 99]], dtype=torch.int32),
            token_lora_mapping=torch.tensor([-1, 0, 1, 2, 5, -7], dtype=torch.int32),
            lora_ids=torch.tensor([-1, 2, 2, 9], dtype=torch.int32)),
        faults=(Fault("gating", "topk_ids", "bitflip", rows=(0, 5), bit=31),
                Fault("dispatch", "recv_topk_weights", "nan", rows=(), fraction=0.5, seed=9),
                Fault("sort_align", "expert_ids", "garbage", rows=(-1,), seed=2),
                Fault("experts", "expert_out", "inf", rows=(1, 2, 3))),
        graph_padding="stale",
    )


RICH_META = CaseMeta(
    origin="fuzz", signature="gating:unique-ids", note="found by the nightly run",
    expect=(Expectation(None, (), "clean"),
            Expectation("cpu", ("topk-nan-argmax", "sort-duplicate-break"), "gating:unique-ids")),
    extra={"executions": 1234, "seconds": 1.5, "seed": 42, "tags": ["a", {"b": None}]},
)


# -- round trips -------------------------------------------------------------------------------


def test_rich_case_round_trips_every_field(tmp_path: Path) -> None:
    case = rich_case()
    path = corpus.save(case, tmp_path, RICH_META)
    loaded, meta = corpus.load(path)
    assert_same_case(case, loaded)
    assert_same_materialized(case, loaded)
    assert meta == RICH_META
    assert corpus.content_hash(loaded) == corpus.content_hash(case) == path.stem


def test_format_covers_every_dataclass_field() -> None:
    doc = corpus.case_to_json(rich_case())
    assert set(doc) == {f.name for f in dataclasses.fields(MoECase)}
    assert set(doc["overrides"]) == {f.name for f in dataclasses.fields(Overrides)}
    for key, cls in (("patches", Patch), ("faults", Fault)):
        assert set(doc[key][0]) == {f.name for f in dataclasses.fields(cls)}
    assert set(doc["correction_bias"]["generated"]) == {f.name
                                                        for f in dataclasses.fields(Generated)}


def test_file_is_strict_pretty_json(tmp_path: Path) -> None:
    path = corpus.save(rich_case(), tmp_path, RICH_META)
    text = path.read_text()
    assert text.endswith("}\n") and "\n  \"case\": {\n" in text
    for token in ("NaN", "Infinity"):
        assert token not in text
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert list(doc) == sorted(doc) and list(doc["case"]) == sorted(doc["case"])
    assert doc["schema"] == corpus.SCHEMA_VERSION == 1
    values = [p["value"] for p in doc["case"]["patches"]]
    assert values[:7] == list(SPECIAL_VALUES) and values[-1] == "nan"  # a NaN float -> "nan"
    assert doc["case"]["overrides"]["topk_weights"]["data"][:3] == [0.5, "nan", "-inf"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [4, 40])
def test_explicit_float_tensors_round_trip(tmp_path: Path, dtype: torch.dtype, T: int) -> None:
    E = 16
    x = (torch.randn(T, E, generator=torch.Generator().manual_seed(T)) * 100).to(dtype)
    info = torch.finfo(dtype)
    x[0, :6] = torch.tensor([math.nan, math.inf, -math.inf, -0.0, info.max, info.tiny / 4],
                            dtype=dtype)
    case = MoECase(num_tokens=T, num_experts=E, topk=2, logits=x, correction_bias=x[1].clone(),
                   overrides=Overrides(gating_logits=x.flip(0)))
    path = corpus.save(case, tmp_path)
    stored = json.loads(path.read_text())["case"]["logits"]["tensor"]
    name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    assert stored["dtype"] == name[dtype] and stored["shape"] == [T, E]
    assert ("data" in stored) == (T * E <= 64) and ("b64" in stored) == (T * E > 64)
    if "b64" in stored:  # little-endian bytes, independently decoded
        import base64
        raw = base64.b64decode(stored["b64"])
        fmt = "<I" if dtype == torch.float32 else "<H"
        step = struct.calcsize(fmt)
        first = [struct.unpack_from(fmt, raw, i * step)[0] for i in range(6)]
        assert first == [int(v) & (2 ** (8 * step) - 1) for v in bits(x)[0, :6].tolist()]
    loaded, _ = corpus.load(path)
    assert_same_case(case, loaded)


def test_nan_payloads_survive_as_bytes(tmp_path: Path) -> None:
    x = torch.zeros(2, 4)
    raw = x.view(torch.int32)  # bits set directly: a float would quieten the signalling NaN
    raw[0, 0], raw[0, 1], raw[1, 2] = 0x7FC00001, -0x00400000, 0x7F800001
    assert math.isnan(x[0, 1]) and math.isnan(x[1, 2])
    case = MoECase(num_tokens=2, num_experts=4, topk=1, logits=x)
    stored = corpus.case_to_json(case)["logits"]["tensor"]
    assert "b64" in stored and "data" not in stored  # a list would canonicalise the NaNs
    loaded, _ = corpus.loads(corpus.dumps(case))
    got = bits(loaded.logits).flatten()[[0, 1, 6]].tolist()
    assert [v & 0xFFFFFFFF for v in got] == [0x7FC00001, 0xFFC00000, 0x7F800001]


def test_int32_overrides_keep_negative_and_extreme_values() -> None:
    ids = torch.tensor([[-1, -2**31], [2**31 - 1, 0]] * 40, dtype=torch.int32)  # 160: b64
    case = MoECase(num_tokens=80, num_experts=4, topk=2, ep_size=2,
                   overrides=Overrides(topk_ids=ids, recv_counters=torch.tensor(
                       [[-3, 7], [2**31 - 1, -2**31]], dtype=torch.int32)))
    loaded, _ = corpus.loads(corpus.dumps(case))
    assert_same_case(case, loaded)
    assert loaded.overrides.recv_counters.tolist() == [[-3, 7], [2**31 - 1, -2**31]]


def test_hand_written_file_may_omit_defaults(tmp_path: Path) -> None:
    path = tmp_path / "hand.json"
    path.write_text('{"schema": 1, "case": {"num_tokens": 4, "num_experts": 8, "topk": 2,'
                    ' "patches": [{"value": "nan"}]}}')
    case, meta = corpus.load(path)
    assert_same_case(case, MoECase(num_tokens=4, num_experts=8, topk=2, patches=(Patch(),)))
    assert meta == CaseMeta()


# -- hashing and saving ------------------------------------------------------------------------


def test_content_hash_is_stable() -> None:
    """Pinned: a change here changes every corpus file name (bump SCHEMA_VERSION instead)."""
    case = MoECase(num_tokens=16, num_experts=8, topk=2, patches=(Patch(value="nan"),))
    assert corpus.content_hash(case) == "074330bd5c560212"
    stored = json.loads(corpus.dumps(case))["case"]  # the definition: sha256 of canonical JSON
    canonical = json.dumps(stored, sort_keys=True, separators=(",", ":")).encode()
    assert hashlib.sha256(canonical).hexdigest()[:16] == "074330bd5c560212"
    h = corpus.content_hash(rich_case())
    assert len(h) == 16 and int(h, 16) >= 0 and h == corpus.content_hash(rich_case())
    assert corpus.content_hash(case.replace(seed=1)) != corpus.content_hash(case)


def test_graph_padding_is_written_only_away_from_its_default() -> None:
    """A case without graph padding hashes as before the field existed; the others differ."""
    case = MoECase(num_tokens=16, num_experts=8, topk=2, patches=(Patch(value="nan"),))
    assert "graph_padding" not in corpus.case_to_json(case)
    hashes = {corpus.content_hash(case)}
    for mode in ("nan", "stale"):
        doc = corpus.case_to_json(case.replace(graph_padding=mode))
        assert doc["graph_padding"] == mode
        assert corpus.case_from_json(doc).graph_padding == mode
        hashes.add(corpus.content_hash(case.replace(graph_padding=mode)))
    assert len(hashes) == 3


def test_hash_ignores_key_order_and_meta(tmp_path: Path) -> None:
    case = rich_case()
    doc = json.loads(corpus.dumps(case, RICH_META))

    def reverse(v):
        if isinstance(v, dict):
            return {k: reverse(v[k]) for k in sorted(v, reverse=True)}
        return [reverse(x) for x in v] if isinstance(v, list) else v

    path = tmp_path / "reversed.json"
    path.write_text(json.dumps(reverse(doc), indent=4))
    assert next(iter(json.loads(path.read_text())["case"])) == "topk"
    loaded, _ = corpus.load(path)
    assert corpus.content_hash(loaded) == corpus.content_hash(case)
    assert corpus.save(case, tmp_path / "a", CaseMeta(origin="demo")).name == \
        corpus.save(case, tmp_path / "b", RICH_META).name


def test_save_is_idempotent_and_merges_meta(tmp_path: Path) -> None:
    case = rich_case()
    first = corpus.save(case, tmp_path, CaseMeta(origin="hand", note="kept",
                                                 expect=(Expectation(None, (), "clean"),),
                                                 extra={"a": 1}))
    text = first.read_text()
    os.utime(first, (1, 1))
    assert corpus.save(case, tmp_path) == first
    assert first.read_text() == text and first.stat().st_mtime == 1  # nothing rewritten
    newer = CaseMeta(origin="fuzz", signature="sort_align:no-poison",
                     expect=(Expectation(None, (), "gating:unique-ids"),
                             Expectation("cuda", ("grid-y-overflow",), "experts:launch-config")),
                     extra={"b": 2})
    assert corpus.save(case, tmp_path, newer) == first
    _, meta = corpus.load(first)
    assert (meta.origin, meta.note, meta.signature) == ("fuzz", "kept", "sort_align:no-poison")
    assert meta.extra == {"a": 1, "b": 2}
    assert meta.expected("cpu") == "gating:unique-ids"  # the newer expectation replaced it
    assert meta.expected("cuda", ["grid-y-overflow"]) == "experts:launch-config"
    assert meta.expected("cpu", ["grid-y-overflow"]) is None
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_expectation_bugs_are_a_set() -> None:
    e = Expectation("cpu", ["sort-duplicate-break", "topk-nan-argmax", "topk-nan-argmax"])
    assert e.bugs == ("sort-duplicate-break", "topk-nan-argmax")
    meta = CaseMeta(expect=(Expectation(None, ("topk-nan-argmax",), "gating:unique-ids"),
                            Expectation("cpu", ("topk-nan-argmax",), "clean")))
    assert meta.expected("cpu", ("topk-nan-argmax",)) == "clean"
    assert meta.expected("cuda", ("topk-nan-argmax",)) == "gating:unique-ids"


def test_save_writes_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    path = corpus.save(rich_case(), tmp_path, CaseMeta(note="one"))
    assert synced and sorted(os.listdir(tmp_path)) == [path.name]
    before = path.read_bytes()

    def crash(src, dst):
        assert Path(src).parent == tmp_path and Path(src).read_text().endswith("}\n")
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(CorpusError, match="cannot write: disk full"):  # one line, exit 2
        corpus.save(rich_case(), tmp_path, CaseMeta(note="two"))
    assert path.read_bytes() == before  # the old file is untouched, the temp file removed
    assert sorted(os.listdir(tmp_path)) == [path.name]


def test_save_rejects_what_it_could_not_read_back() -> None:
    bad = [
        (MoECase(num_tokens=4, num_experts=2, topk=3), "case.topk"),
        (MoECase(num_tokens=2, num_experts=4, topk=1,
                 logits=torch.zeros(2, 4, dtype=torch.float64)), "case.logits.tensor.dtype"),
        (MoECase(num_tokens=2, num_experts=4, topk=1, renormalize=1), "case.renormalize"),
        (MoECase(num_tokens=2, num_experts=4, topk=1, adapter_enabled=(1,), max_loras=1),
         "case.adapter_enabled[0]"),
    ]
    for case, field in bad:
        with pytest.raises(CorpusError) as info:
            corpus.case_to_json(case)
        assert info.value.field == field and info.value.path == "<memory>"
    for meta, field in ((CaseMeta(expect=(Expectation(bugs=("nope",)),)), "meta.expect[0].bugs[0]"),
                        (CaseMeta(extra={"t": math.inf}), "meta.extra.t"),
                        (CaseMeta(extra={"t": object()}), "meta.extra.t"),
                        (CaseMeta(signature="no colon"), "meta.signature")):
        with pytest.raises(CorpusError) as info:
            corpus.dumps(MoECase(num_tokens=1, num_experts=1, topk=1), meta)
        assert info.value.field == field


# -- corrupt files -----------------------------------------------------------------------------


def valid_doc() -> dict:
    case = MoECase(num_tokens=12, num_experts=8, topk=2, logits=torch.randn(12, 8),
                   faults=(Fault(), Fault(), Fault("dispatch", "recv_counters", "drop")))
    return json.loads(corpus.dumps(case, RICH_META))


def edit(fn):
    def text() -> str:
        doc = valid_doc()
        fn(doc)
        return json.dumps(doc)
    return text


def setitem(path: str, value):
    def fn(doc):
        *parents, last = path.split("/")
        for p in parents:
            doc = doc[int(p)] if isinstance(doc, list) else doc[p]
        doc[int(last) if isinstance(doc, list) else last] = value
    return edit(fn)


CORRUPT = {
    "empty": (lambda: "", None, "empty"),
    "blank": (lambda: " \n\t", None, "empty"),
    "invalid json": (lambda: '{"schema": 1,', None, "not valid JSON"),
    "array": (lambda: "[1, 2]", None, "JSON object"),
    "bare NaN": (lambda: '{"schema": 1, "case": NaN}', None, "NaN"),
    "duplicate key": (lambda: '{"schema": 1, "schema": 1}', None, "twice"),
    "schema 2": (setitem("schema", 2), "schema", "schema version 2"),
    "schema string": (setitem("schema", "1"), "schema", "schema version"),
    "schema true": (setitem("schema", True), "schema", "schema version"),
    "no schema": (edit(lambda d: d.pop("schema")), "schema", "missing"),
    "no case": (edit(lambda d: d.pop("case")), "case", "missing"),
    "top-level unknown key": (setitem("extra", 1), "extra", "unknown key"),
    "case not an object": (setitem("case", [1]), "case", "object"),
    "unknown key": (setitem("case/bogus", 1), "case.bogus", "unknown key"),
    "missing topk": (edit(lambda d: d["case"].pop("topk")), "case.topk", "missing"),
    "wrong type": (setitem("case/num_tokens", "12"), "case.num_tokens", "integer"),
    "float for int": (setitem("case/num_tokens", 12.0), "case.num_tokens", "integer"),
    "bool for int": (setitem("case/seed", False), "case.seed", "integer"),
    "fault kind type": (setitem("case/faults/2/kind", 5), "case.faults[2].kind", "string"),
    "fault kind enum": (setitem("case/faults/2/kind", "melt"), "case.faults[2].kind", "one of"),
    "fault tensor": (setitem("case/faults/1/tensor", "recv_counters"), "case.faults[1].tensor",
                     "topk_ids"),
    "fault nan on ints": (setitem("case/faults/0/kind", "nan"), "case.faults[0]", "integer"),
    "bad enum": (setitem("case/scoring", "foo"), "case.scoring", "softmax"),
    "graph padding": (setitem("case/graph_padding", "ones"), "case.graph_padding", "stale"),
    "K > E": (setitem("case/topk", 9), "case.topk", "num_experts"),
    "T = 0": (setitem("case/num_tokens", 0), "case.num_tokens", "1.."),
    "renormalize type": (setitem("case/renormalize", 0), "case.renormalize", "true or false"),
    "patch value": (setitem("case/patches", [{"value": "nanana"}]), "case.patches[0].value",
                    "tie"),
    "source both": (setitem("case/logits/generated", {}), "case.logits", "exactly one"),
    "bad base64": (setitem("case/logits/tensor/b64", "!!not base64!!"), "case.logits.tensor.b64",
                   "base64"),
    "byte length": (setitem("case/logits/tensor/b64", "AAAA"), "case.logits.tensor.b64",
                    "3 bytes"),
    "shape vs case": (setitem("case/logits/tensor/shape", [8, 12]), "case.logits", "shape"),
    "negative dim": (setitem("case/logits/tensor/shape", [-12, -8]), "case.logits.tensor.shape",
                     ">= 0"),
    "unknown dtype": (setitem("case/logits/tensor/dtype", "float64"), "case.logits.tensor.dtype",
                      "float64"),
    "data and b64": (setitem("case/logits/tensor/data", [0.0] * 96), "case.logits.tensor",
                     "exactly one"),
    "data length": (setitem("case/overrides", {"topk_ids": {"dtype": "int32", "shape": [12, 2],
                                                            "data": [0, 1]}}),
                    "case.overrides.topk_ids.data", "24 values"),
    "int32 overflow": (setitem("case/overrides", {"lora_ids": {"dtype": "int32", "shape": [1],
                                                               "data": [2**31]}}),
                       "case.overrides.lora_ids.data[0]", "int32"),
    "float in int data": (setitem("case/overrides", {"recv_counters": {
        "dtype": "int32", "shape": [1, 1], "data": [1.5]}}),
        "case.overrides.recv_counters.data[0]", "integer"),
    "override shape": (setitem("case/overrides", {"topk_ids": {"dtype": "int32", "shape": [2],
                                                               "data": [0, 1]}}),
                       "case.overrides.topk_ids", "shape"),
    "unknown variant": (setitem("meta/expect/1/bugs", ["topk-nan-argmax", "no-such-bug"]),
                        "meta.expect[1].bugs[1]", "no-such-bug"),
    "bad outcome": (setitem("meta/expect/0/outcome", "crashed"), "meta.expect[0].outcome",
                    "stage:check"),
    "duplicate expectation": (setitem("meta/expect", [{"outcome": "clean"}] * 2),
                              "meta.expect[1]", "expect[0]"),
    "meta unknown key": (setitem("meta/origin_story", "x"), "meta.origin_story", "unknown"),
    "empty origin": (setitem("meta/origin", ""), "meta.origin", "empty"),
    "extra not object": (setitem("meta/extra", [1]), "meta.extra", "object"),
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_corrupt_file_names_file_and_field(tmp_path: Path, name: str) -> None:
    make, field, fragment = CORRUPT[name]
    path = tmp_path / "corrupt.json"
    path.write_text(make())
    with pytest.raises(CorpusError) as info:
        corpus.load(path)
    err = info.value
    assert err.path == str(path) and str(path) in str(err)
    assert err.field == field
    if field:
        assert f"field '{field}'" in str(err)
    assert fragment in str(err)


def test_valid_doc_of_the_corrupt_table_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(valid_doc()))
    assert corpus.load(path)[1] == RICH_META  # so each failure above is the edit's doing


def test_unreadable_files(tmp_path: Path) -> None:
    for path, fragment in ((tmp_path / "missing.json", "no such file"),
                           (tmp_path, "cannot read")):
        with pytest.raises(CorpusError, match=fragment) as info:
            corpus.load(path)
        assert info.value.path == str(path) and info.value.field is None
    binary = tmp_path / "binary.json"
    binary.write_bytes(b'{"schema": 1, \xff\xfe}')
    with pytest.raises(CorpusError, match="UTF-8"):
        corpus.load(binary)


# -- directories -------------------------------------------------------------------------------


def test_iter_corpus_is_sorted_recursive_and_skips_hidden(tmp_path: Path) -> None:
    for rel in ("b.json", "a.json", "sub/c.json", ".hidden.json", ".git/x.json",
                ".a.json.123.tmp", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("{}")
    got = [p.relative_to(tmp_path).as_posix() for p in corpus.iter_corpus(tmp_path)]
    assert got == ["a.json", "b.json", "sub/c.json"]
    assert list(corpus.iter_corpus(tmp_path / "missing")) == []
    assert list(corpus.iter_corpus(tmp_path / "a.json")) == [tmp_path / "a.json"]
    with pytest.raises(CorpusError):
        list(corpus.iter_corpus(tmp_path / "notes.txt"))


def test_check_corpus_reports_bad_files_names_and_duplicates(tmp_path: Path) -> None:
    cases = [MoECase(num_tokens=4, num_experts=8, topk=k) for k in (1, 2, 3)]
    paths = [corpus.save(c, tmp_path / "corpus") for c in cases]
    assert corpus.check_corpus(tmp_path / "corpus") == []
    copy = tmp_path / "corpus" / "sub" / "renamed.json"
    copy.parent.mkdir()
    copy.write_bytes(paths[1].read_bytes())
    (tmp_path / "corpus" / "broken.json").write_text("{")
    errors = corpus.check_corpus(tmp_path / "corpus")
    by_path: dict[str, list[str]] = {}
    for e in errors:
        by_path.setdefault(e.path, []).append(str(e))
    assert set(by_path) == {str(copy), str(tmp_path / "corpus" / "broken.json")}
    assert any("does not match the content hash" in m for m in by_path[str(copy)])
    assert any(f"duplicate of {paths[1]}" in m for m in by_path[str(copy)])
    assert "not valid JSON" in by_path[str(tmp_path / "corpus" / "broken.json")][0]


# -- property: every generated case survives the round trip ------------------------------------

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@st.composite
def float_tensors(draw, shape: tuple[int, ...]) -> torch.Tensor:
    values = draw(st.lists(floats, min_size=math.prod(shape), max_size=math.prod(shape)))
    return torch.tensor(values, dtype=torch.float32).reshape(shape).to(draw(dtypes))


@st.composite
def int_tensors(draw, shape: tuple[int, ...], lo: int = -2**31, hi: int = 2**31 - 1):
    values = draw(st.lists(st.integers(lo, hi), min_size=math.prod(shape),
                           max_size=math.prod(shape)))
    return torch.tensor(values, dtype=torch.int32).reshape(shape)


@st.composite
def moe_cases(draw) -> MoECase:
    E = draw(st.integers(1, 16))
    K = draw(st.integers(1, min(E, 4)))
    T = draw(st.integers(1, 12))
    ep = draw(st.integers(1, min(E, 4)))
    L = draw(st.integers(0, 3))
    generated = st.builds(Generated, st.integers(0, 2**40), st.sampled_from(
        ["normal", "uniform", "zeros", "quantized"]), st.floats(-1e6, 1e6))
    logits = draw(st.one_of(generated, float_tensors((T, E))))
    bias = draw(st.one_of(st.none(), generated, float_tensors((E,))))
    targets = [t for t in PATCH_TARGETS if t != "correction_bias" or bias is not None]
    patches = draw(st.lists(st.builds(
        Patch, st.sampled_from(targets), st.sampled_from(["cell", "row", "column", "all"]),
        st.one_of(st.sampled_from(SPECIAL_VALUES), floats, st.floats()),
        st.integers(0, 100), st.integers(0, 100)), max_size=4))
    over = {}
    if draw(st.booleans()):
        over["topk_ids"] = draw(int_tensors((T, K), -3, E + 2))
        if draw(st.booleans()):
            over["topk_weights"] = draw(float_tensors((T, K)))
    if draw(st.booleans()):
        over["gating_logits"] = draw(float_tensors((T, E)))
    if draw(st.booleans()):
        over["recv_counters"] = draw(int_tensors((ep, ep)))
    if L and draw(st.booleans()):
        over["token_lora_mapping"] = draw(int_tensors((T,), -2, L + 1))
        over["lora_ids"] = draw(int_tensors((L + 1,), -2, L + 1))

    @st.composite
    def faults(draw2) -> Fault:
        boundary = draw2(st.sampled_from(list(FAULT_TENSORS)))
        tensor = draw2(st.sampled_from(sorted(FAULT_TENSORS[boundary])))
        kinds = [k for k in FAULT_KINDS
                 if FAULT_TENSORS[boundary][tensor] == "float" or k not in ("nan", "inf")]
        return Fault(boundary, tensor, draw2(st.sampled_from(kinds)),
                     tuple(draw2(st.lists(st.integers(-50, 50), max_size=3))),
                     draw2(st.floats(0, 1)), draw2(st.integers(0, 2**31)),
                     draw2(st.integers(0, 31)))

    return MoECase(
        num_tokens=T, num_experts=E, topk=K, scoring=draw(st.sampled_from(["softmax", "sigmoid"])),
        renormalize=draw(st.booleans()), dtype=draw(st.sampled_from(["fp32", "fp16", "bf16"])),
        hidden_size=draw(st.integers(1, 8)), block_size=2 ** draw(st.integers(0, 8)),
        seed=draw(st.integers(0, 2**63)), logits=logits, correction_bias=bias,
        patches=tuple(patches), ep_size=ep,
        max_tokens_per_rank=draw(st.one_of(st.none(), st.integers(math.ceil(T / ep), 64))),
        expert_to_rank=draw(st.one_of(st.none(), st.lists(st.integers(0, ep - 1), min_size=E,
                                                          max_size=E).map(tuple))),
        max_loras=L,
        adapter_enabled=draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=L,
                                                           max_size=L).map(tuple))),
        overrides=Overrides(**over), faults=tuple(draw(st.lists(faults(), max_size=3))),
    )


@given(moe_cases())
def test_property_round_trip(case: MoECase) -> None:
    text = corpus.dumps(case)
    loaded, _ = corpus.loads(text, "<prop>")
    assert_same_case(case, loaded)
    assert corpus.dumps(loaded) == text
    assert corpus.content_hash(loaded) == corpus.content_hash(case)
    assert_same_materialized(case, loaded)


def test_found_with_reads_the_variants_the_store_writes(tmp_path):
    """The findings store and the fuzzer's sanitizer write extra["variants"]; triage and the
    CLI read a finding's variant set through `CaseMeta.found_with` alone."""
    from harness.findings import Finding
    from harness.fuzz.store import FindingStore

    store = FindingStore(tmp_path, "cpu", ("topk-nan-argmax",), 0)
    stored = store.record(MoECase(2, 4, 2), Finding("gating", "unique-ids", "dup"), 0.1, 1)
    _, meta = corpus.load(stored.path)
    assert meta.found_with() == ("topk-nan-argmax",)
    no_expectation = CaseMeta(signature="gating:unique-ids", extra={"variants": ["b", "a"]})
    assert no_expectation.found_with() == ("a", "b")
    assert CaseMeta().found_with() == ()
