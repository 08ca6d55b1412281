"""Tests of harness.invariants: every check fires on a corrupted output and stays silent on the
fixed chain; each bug variant's trigger case yields its registered signatures; property: the
fixed chain yields no finding on any valid case, faults and out-of-contract overrides included."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import invariants, oracle
from harness.backends.cpu import CpuTarget
from harness.bugs import VARIANTS, BugSet
from harness.case import (
    FAULT_KINDS,
    FAULT_TENSORS,
    SPECIAL_VALUES,
    Fault,
    Generated,
    MoECase,
    Overrides,
    Patch,
)
from harness.chain.result import RunResult
from harness.chain.runner import run_case
from harness.memory import POISON_I32, is_poison

TARGET = CpuTarget()
I32 = torch.int32


def run(case: MoECase, bugs=()) -> RunResult:
    return run_case(case, TARGET, BugSet.of(bugs))


def sigs(result: RunResult) -> set[str]:
    return {f.signature for f in invariants.check(result)}


def altered(dc, **edits):
    """A copy of dataclass `dc` whose named tensors are cloned and edited in place by
    `edits[name](tensor)` (the stages downstream keep the original tensors)."""
    changes = {}
    for name, edit in edits.items():
        t = getattr(dc, name).clone()
        edit(t)
        changes[name] = t
    return dataclasses.replace(dc, **changes)


BASE = MoECase(num_tokens=16, num_experts=8, topk=2, hidden_size=4, block_size=4, seed=3)
EP = MoECase(num_tokens=24, num_experts=8, topk=2, ep_size=2, max_tokens_per_rank=16,
             hidden_size=4, block_size=4, seed=5)
RENORM = MoECase(num_tokens=16, num_experts=8, topk=3, renormalize=True, seed=1)
LORA = MoECase(num_tokens=16, num_experts=8, topk=2, block_size=4, max_loras=3,
               adapter_enabled=(True, False, True),
               overrides=Overrides(token_lora_mapping=torch.tensor([-1, 0, 1, 2] * 4, dtype=I32)))


@pytest.fixture(scope="module")
def clean():
    results = {name: run(case) for name, case in
               (("base", BASE), ("ep", EP), ("renorm", RENORM), ("lora", LORA))}
    for r in results.values():
        assert r.completed and invariants.check(r) == []
    return results


def fresh(result: RunResult) -> RunResult:
    return dataclasses.replace(result, findings=list(result.findings))


# -- silent on the fixed chain -----------------------------------------------------------------

SILENT = [
    BASE, EP, RENORM, LORA,
    MoECase(1, 1, 1),
    MoECase(300, 6, 3, scoring="sigmoid", dtype="bf16", block_size=64),  # three-step, fallback
    MoECase(40, 16, 4, dtype="fp16", logits=Generated(1, "quantized", 1.0),  # ties
            correction_bias=Generated(2, "normal", 0.5)),
    MoECase(20, 8, 3, renormalize=True, patches=(Patch("gating_logits", "row", "nan", 2),
                                                 Patch("gating_logits", "cell", "inf", 5, 1),
                                                 Patch("gating_logits", "row", "-inf", 7),
                                                 Patch("hidden_states", "row", "nan", 3),
                                                 Patch("hidden_states", "cell", "huge", 4))),
    MoECase(12, 8, 2, ep_size=4, expert_to_rank=(3, 3, 0, 0, 0, 0, 0, 3)),  # empty ranks
    MoECase(6, 4, 4, scoring="sigmoid", renormalize=True,  # subnormal / zero sums
            patches=(Patch("gating_logits", "row", -100.0, 1), Patch("gating_logits", "row",
                                                                      -90.0, 2))),
    MoECase(10, 8, 2, correction_bias=Generated(1), patches=(  # bias below the mask value
        Patch("correction_bias", "cell", "nan", 0, 2),
        Patch("correction_bias", "cell", -2e4, 0, 5))),
]


@pytest.mark.parametrize("case", SILENT, ids=range(len(SILENT)))
def test_fixed_chain_is_silent(case):
    result = run(case)
    assert result.findings == [] and invariants.check(result) == []


def test_out_of_contract_overrides_are_silent():
    ids = torch.tensor([[0, 0], [9, -1], [-5, 3], [2, 2**30]] * 2, dtype=I32)
    case = MoECase(8, 8, 2, ep_size=2, max_loras=2, overrides=Overrides(
        topk_ids=ids, topk_weights=torch.tensor([[math.nan, 1.0]] * 8),
        recv_counters=torch.tensor([[9, -3], [1, 2]], dtype=I32),
        token_lora_mapping=torch.tensor([-4, 0, 1, 5] * 2, dtype=I32),
        lora_ids=torch.tensor([1, 1, 9], dtype=I32)))
    assert case.severity == "out-of-contract"
    assert sigs(run(case)) == set()


def test_faults_are_held_stage_locally():
    # NaN expert outputs reach finalize and the output; no stage is blamed, no chain check
    case = BASE.replace(faults=(Fault("experts", "expert_out", "nan", rows=(0, 1)),
                                Fault("sort_align", "permuted_row", "garbage", rows=(0,)),
                                Fault("gating", "topk_ids", "duplicate", rows=(3,))))
    result = run(case)
    assert not bool(torch.isfinite(result.output).all())
    assert invariants.check(result) == []


# -- each check fires on a corrupted output ----------------------------------------------------


def test_gating_checks(clean):
    r = clean["base"]
    E = BASE.num_experts

    def with_out(**edits):
        res = fresh(r)
        res.gating_out = altered(r.gating_out, **edits)
        res.output = None  # the chain downstream ran on the original routing
        return sigs(res)

    assert with_out(topk_ids=lambda t: t[0].__setitem__(0, E)) == {"gating:ids-in-range"}
    assert with_out(topk_ids=lambda t: t[1].__setitem__(1, t[1, 0])) == {"gating:unique-ids"}
    assert with_out(topk_weights=lambda t: t[0].__setitem__(0, math.nan)) == {
        "gating:weights-finite"}
    assert with_out(topk_weights=lambda t: t[0].__setitem__(1, -0.1)) == {"gating:weights-finite"}
    assert with_out(topk_weights=lambda t: t[0].__iadd__(0.01)) == {"gating:matches-oracle"}
    # the weakest expert instead of the second: unique, in range, with its own weight
    s = oracle.scores(r.gating_in.gating_logits, "softmax")
    worst = int(s[0].argmin())

    def swap(ids):
        ids[0, 1] = worst
    res = fresh(r)
    res.gating_out = altered(r.gating_out, topk_ids=swap,
                             topk_weights=lambda w: w[0].__setitem__(1, float(s[0, worst])))
    res.output = None
    found = invariants.check(res)
    assert [f.signature for f in found] == ["gating:matches-oracle"]
    assert found[0].details["rows"] == [0] and found[0].details["oracle_ids"][0][1] != worst


def test_gating_findings_show_the_oracles_rows_beside_the_offending_ones(clean):
    """What a failing corpus case prints (corpus/explain.py) is these details: every gating
    finding carries the oracle's ids and weights of its rows, not only the stage's."""
    from harness.corpus.explain import format_details

    r = clean["base"]
    res = fresh(r)
    res.gating_out = altered(r.gating_out, topk_ids=lambda t: t[1].__setitem__(1, t[1, 0]),
                             topk_weights=lambda t: t[2].__setitem__(0, math.nan))
    res.output = None
    found = {f.signature: f for f in invariants.check(res)}
    want = oracle.gating(r.gating_in)
    dup, nan = found["gating:unique-ids"].details, found["gating:weights-finite"].details
    assert dup["rows"] == [1] and dup["oracle_ids"] == [want.topk_ids[1].tolist()]
    assert dup["ids"][0][0] == dup["ids"][0][1] != dup["oracle_ids"][0][1]
    assert nan["rows"] == [2] and nan["oracle_weights"][0] == pytest.approx(
        want.topk_weights[2].tolist())
    header = [c.strip() for c in format_details(dup)[0].split(" | ")]
    assert header[:3] == ["rows", "ids", "oracle_ids"]


def test_sort_align_bijection_finding_shows_the_oracles_layout(clean):
    r = clean["base"]
    out = r.ranks[0].sort_out
    perm = out.permuted_row
    x0, x1 = int(out.sorted_token_ids[0]), int(out.sorted_token_ids[out.aligned_offsets[-2]])
    res = fresh(r)
    res.ranks = list(r.ranks)
    rr = dataclasses.replace(r.ranks[0])
    rr.sort_out = altered(out, permuted_row=lambda t: t.__setitem__([x0, x1], perm[[x1, x0]]))
    res.ranks[0] = rr
    [f] = [f for f in invariants.check(res) if f.check == "permutation-bijection"]
    d = f.details
    assert len(d["oracle_permuted_row"]) == len(d["rows"]) > 0
    assert d["oracle_permuted_row"] != d["permuted_row"]
    assert len(d["oracle_sorted_token_ids"]) == len(d["positions"])


def test_gating_renormalized(clean):
    r = fresh(clean["renorm"])
    r.gating_out = altered(r.gating_out, topk_weights=lambda w: w[2].mul_(0.5))
    r.output = None
    assert sigs(r) == {"gating:renormalized"}


def test_gating_accepts_ties_in_any_order_but_not_disorder():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 2.0]])
    r = run(MoECase(2, 4, 2, overrides=Overrides(gating_logits=logits)))
    assert r.gating_out.topk_ids.tolist() == [[0, 1], [1, 2]]
    tied = fresh(r)
    tied.output = None  # the chain downstream ran on the original routing
    tied.gating_out = altered(r.gating_out, topk_ids=lambda t: t.copy_(
        torch.tensor([[0, 2], [3, 1]], dtype=I32)))
    assert sigs(tied) == set()  # tied experts: any of them, in any order
    swapped = fresh(r)
    swapped.output = None
    swapped.gating_out = altered(r.gating_out, topk_ids=lambda t: t[0].copy_(t[0].flip(0)),
                                 topk_weights=lambda w: w[0].copy_(w[0].flip(0)))
    assert sigs(swapped) == {"gating:matches-oracle"}  # not in descending order


def test_dispatch_checks(clean):
    r = clean["ep"]
    out = r.dispatch_out
    count = int(out.recv_counters[0, 0])
    assert 0 < count < EP.recv_slots

    def with_out(**edits):
        res = fresh(r)
        res.dispatch_out = altered(out, **edits)
        return sigs(res)

    assert with_out(recv_topk_ids=lambda t: t[0, 0, count].fill_(3)) == {
        "dispatch:padding-sanitized"}
    assert with_out(recv_counters=lambda t: t[0, 0].add_(1)) == {"dispatch:counters-match"}
    assert with_out(recv_token_index=lambda t: t[0, 0, 0].add_(1)) == {"dispatch:slots-match"}
    assert with_out(recv_topk_ids=lambda t: t[1, 1, 0, 1].add_(1)) == {"dispatch:slots-match"}
    assert with_out(recv_hidden=lambda t: t[0, 1, 0, 0].add_(1)) == {"dispatch:slots-match"}


def test_counters_override_is_not_held_to_the_routing():
    true = run(EP).dispatch_out.recv_counters
    case = EP.replace(overrides=Overrides(recv_counters=(true - 1).to(I32)))
    assert case.severity == "out-of-contract" and sigs(run(case)) == set()


def _sort(r: RunResult, rank: int = 0, **edits) -> set[str]:
    res = fresh(r)
    res.ranks = list(r.ranks)
    rr = dataclasses.replace(r.ranks[rank])
    rr.sort_out = altered(rr.sort_out, **edits)
    res.ranks[rank] = rr
    return sigs(res)


def test_sort_align_checks(clean):
    r = clean["base"]
    out = r.ranks[0].sort_out
    perm = out.permuted_row
    x0, x1 = int(out.sorted_token_ids[0]), int(out.sorted_token_ids[out.aligned_offsets[-2]])
    assert _sort(r, permuted_row=lambda t: t.__setitem__(x0, POISON_I32)) >= {
        "sort_align:no-poison"}
    # two rows of different experts exchange positions: not inverse any more
    assert _sort(r, permuted_row=lambda t: t.__setitem__([x0, x1], perm[[x1, x0]])) == {
        "sort_align:permutation-bijection"}
    assert _sort(r, expert_offsets=lambda t: t[1:].add_(1)) == {"sort_align:prefix-sums"}
    assert _sort(r, expert_ids=lambda t: t[-1:].fill_(0)) == {"sort_align:alignment"}


def test_sort_align_unstable_order_is_only_an_oracle_mismatch(clean):
    r = clean["base"]
    out = r.ranks[0].sort_out
    e = int(torch.nonzero(out.expert_counts >= 2)[0])
    p = int(out.aligned_offsets[e])
    a, b = int(out.sorted_token_ids[p]), int(out.sorted_token_ids[p + 1])

    def swap_ids(t):
        t[p], t[p + 1] = b, a

    def swap_perm(t):
        t[a], t[b] = p + 1, p
    found = _sort(r, sorted_token_ids=swap_ids, permuted_row=swap_perm)
    assert found == {"sort_align:matches-oracle"}


def test_sort_align_padding_must_hold_the_sentinel(clean):
    r = clean["base"]
    out = r.ranks[0].sort_out
    pad = int(out.aligned_offsets[0] + out.expert_counts[0])
    assert pad < int(out.aligned_offsets[1])  # expert 0 has padding
    assert "sort_align:alignment" in _sort(r, sorted_token_ids=lambda t: t.__setitem__(pad, 0))


def test_experts_and_finalize_checks(clean):
    r = clean["base"]
    rr0 = r.ranks[0]
    p = int(rr0.sort_out.aligned_offsets[1])  # the first position of expert 1: a real row

    def with_rank(**fields):
        res = fresh(r)
        res.ranks = [dataclasses.replace(rr0, **fields)]
        return sigs(res)

    bumped = rr0.experts_out.expert_out.clone()
    bumped[p] += 1.0
    assert with_rank(experts_out=dataclasses.replace(rr0.experts_out, expert_out=bumped)) == {
        "experts:matches-oracle"}
    pad = int(rr0.sort_out.aligned_offsets[0] + rr0.sort_out.expert_counts[0])
    free = rr0.experts_out.expert_out.clone()
    free[pad] = 123.0  # a padding position holds anything
    assert with_rank(experts_out=dataclasses.replace(rr0.experts_out, expert_out=free)) == set()
    out = rr0.finalize_out.clone()
    out[0, 0] += 0.5
    assert with_rank(finalize_out=out) == {"finalize:matches-oracle"}
    out[0, 0] = math.inf
    assert with_rank(finalize_out=out) == {"finalize:finite"}


def test_chain_checks(clean):
    r = clean["ep"]
    res = fresh(r)
    res.output = r.output.clone()
    res.output[3, 1] -= 0.25
    assert sigs(res) == {"chain:matches-oracle"}
    res.output[3, 1] = math.nan
    assert sigs(res) == {"chain:finite"}
    # with a fault (severity "fault") the end-to-end comparison does not apply
    faulted = run(EP.replace(faults=(Fault("dispatch", "recv_topk_weights", "zero_rows",
                                           rows=(0,)),)))
    assert faulted.case.severity == "fault" and sigs(faulted) == set()


def test_lora_checks(clean):
    r = clean["lora"]
    out = r.lora_out
    assert out.num_tokens_post_pad[0] > 0 and bool(is_poison(out.sorted_token_ids[1]).all())

    def with_out(**edits):
        res = fresh(r)
        res.lora_out = altered(out, **edits)
        return sigs(res)

    assert with_out(num_tokens_post_pad=lambda t: t[0].add_(4)) == {"lora_align:adapter-tokens"}
    assert with_out(sorted_token_ids=lambda t: t[2, 0].fill_(POISON_I32)) == {
        "lora_align:no-poison", "lora_align:adapter-tokens"}
    assert with_out(sorted_token_ids=lambda t: t[1, 5].fill_(0)) == {
        "lora_align:disabled-untouched"}
    assert with_out(expert_ids=lambda t: t[0, 0].add_(1)) == {"lora_align:adapter-tokens"}
    # within one expert's run the order is free (the real kernel scatters with atomics)...
    want = oracle.lora_align(r.lora_in)
    counts = torch.bincount(r.lora_in.topk_ids[r.lora_in.token_lora_mapping == 0].flatten(),
                            minlength=8)
    e = int(torch.nonzero(counts >= 2)[0])
    p = int(torch.nonzero(want.expert_ids[0] == e)[0]) * LORA.block_size
    assert with_out(sorted_token_ids=lambda t: t[0, p:p + 2].copy_(t[0, p:p + 2].flip(0))) == set()
    # ... but not across runs
    q = int(torch.nonzero(want.expert_ids[0] > e)[0]) * LORA.block_size
    assert with_out(sorted_token_ids=lambda t: t[0].__setitem__([p, q], t[0, [q, p]])) == {
        "lora_align:adapter-tokens"}


# -- robustness --------------------------------------------------------------------------------


def test_garbage_outputs_become_findings_not_exceptions(clean):
    g = torch.Generator().manual_seed(0)
    r = fresh(clean["lora"])

    def junk(t):
        t.copy_(torch.randint(-2**31, 2**31 - 1, t.shape, generator=g).to(t.dtype))
    r.gating_out = altered(r.gating_out, topk_ids=junk,
                           topk_weights=lambda w: w.fill_(math.nan))
    rr = dataclasses.replace(r.ranks[0])
    rr.sort_out = dataclasses.replace(
        altered(rr.sort_out, expert_counts=junk, expert_offsets=junk, aligned_offsets=junk,
                permuted_row=junk, sorted_token_ids=junk, expert_ids=junk),
        num_tokens_post_pad=10**12)
    rr.experts_in = dataclasses.replace(altered(rr.experts_in, sorted_token_ids=junk,
                                                expert_ids=junk), num_tokens_post_pad=-7)
    rr.finalize_in = altered(rr.finalize_in, permuted_row=junk)
    r.ranks = [rr]
    r.lora_out = altered(r.lora_out, sorted_token_ids=junk, expert_ids=junk,
                         num_tokens_post_pad=junk)
    found = invariants.check(r)
    got = {f.signature for f in found}
    assert {"gating:ids-in-range", "gating:weights-finite", "sort_align:prefix-sums",
            "lora_align:adapter-tokens"} <= got
    assert not any(f.check == "check-error" for f in found), found
    for f in found:
        json.dumps(f.to_json(), allow_nan=False)


def test_wrong_shapes_and_failing_checks(clean, monkeypatch):
    r = fresh(clean["base"])
    rr = dataclasses.replace(r.ranks[0])
    rr.sort_out = dataclasses.replace(rr.sort_out, permuted_row=rr.sort_out.permuted_row[:-1])
    r.ranks = [rr]
    assert sigs(r) == {"sort_align:output-shape"}

    def broken(*args):
        raise RuntimeError("boom")
    monkeypatch.setattr(oracle, "sort_align", broken)
    assert sigs(fresh(clean["base"])) == {"sort_align:check-error"}


def test_one_finding_per_signature_first_rank_details(clean):
    r = fresh(clean["ep"])
    ranks = []
    for rr in r.ranks:
        rr = dataclasses.replace(rr)
        rr.finalize_out = rr.finalize_out + 1.0
        ranks.append(rr)
    r.ranks = ranks
    found = invariants.check(r)
    assert [f.signature for f in found] == ["finalize:matches-oracle"]
    assert found[0].details["rank"] == 0 and found[0].severity == "legal"


def test_severity_comes_from_the_case():
    case = BASE.replace(overrides=Overrides(topk_ids=torch.full((16, 2), 9, dtype=I32)))
    r = run(case)
    res = fresh(r)
    res.ranks = [dataclasses.replace(r.ranks[0], finalize_out=r.ranks[0].finalize_out + 1)]
    assert [f.severity for f in invariants.check(res)] == ["out-of-contract"]


def test_chunked_paths(monkeypatch):
    monkeypatch.setattr(oracle, "GATING_CHUNK_ELEMS", 40)
    monkeypatch.setattr(oracle, "COMBINE_CHUNK_ELEMS", 50)
    monkeypatch.setattr(oracle, "GATHER_LIMIT", 0)
    case = MoECase(50, 8, 3, renormalize=True, hidden_size=4, block_size=2, ep_size=2)
    r = run(case)
    assert invariants.check(r) == []
    res = fresh(r)
    res.gating_out = altered(r.gating_out, topk_weights=lambda w: w[37].mul_(0.5))
    res.output = None
    assert sigs(res) == {"gating:renormalized"}


# -- the bug variants --------------------------------------------------------------------------

DUPLICATES = torch.arange(600, dtype=I32).remainder(8).view(300, 2)
DUPLICATES[::3, 1] = DUPLICATES[::3, 0]

#: one trigger case per variant: the bad behaviour with the variant, nothing without it
TRIGGERS = {
    "topk-nan-argmax": MoECase(8, 8, 2, patches=(Patch("gating_logits", "row", "nan", 1),)),
    "a2a-unsanitized-padding": MoECase(16, 8, 2, ep_size=2, max_tokens_per_rank=12),
    "sort-duplicate-break": MoECase(300, 8, 2, overrides=Overrides(topk_ids=DUPLICATES)),
    "grid-y-overflow": MoECase(65536, 1, 1, block_size=1, hidden_size=1),
    "lora-grid-off-by-one": MoECase(16, 8, 2, max_loras=2, overrides=Overrides(
        token_lora_mapping=torch.tensor([-1, 0, 1, 1] * 4, dtype=I32))),
    "lora-id-unchecked": MoECase(16, 8, 2, max_loras=2, overrides=Overrides(
        lora_ids=torch.tensor([-1, 0, 5], dtype=I32))),
    "lora-disabled-adapter": MoECase(16, 8, 2, max_loras=2, adapter_enabled=(True, False)),
}


def test_every_variant_has_a_trigger():
    assert set(TRIGGERS) == set(VARIANTS)


@pytest.mark.parametrize("name", sorted(TRIGGERS))
def test_variant_trigger(name):
    case = TRIGGERS[name]
    assert sigs(run(case)) == set()
    found = invariants.check(run(case, [name]))
    got = {f.signature for f in found}
    expected = set(VARIANTS[name].signatures)
    assert got & expected, got
    assert got <= expected, got
    for f in found:
        assert f.severity == case.severity
        json.dumps(f.to_json(), allow_nan=False)


def test_issue_39244_composition():
    """NaN rows -> duplicate ids (gating) -> the three-step sort loses the duplicates."""
    case = MoECase(300, 8, 2, patches=(Patch("gating_logits", "row", "nan", 7),
                                       Patch("gating_logits", "row", "nan", 280)))
    assert sigs(run(case)) == set()
    got = sigs(run(case, ["topk-nan-argmax", "sort-duplicate-break"]))
    assert {"gating:unique-ids", "sort_align:permutation-bijection"} <= got


# -- property: the fixed chain is silent on every valid case -----------------------------------


@st.composite
def cases(draw) -> MoECase:
    E = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 8, 12, 16, 32]))
    K = draw(st.integers(1, min(E, 4)))
    T = draw(st.one_of(st.integers(1, 40), st.just(260)))
    ep = draw(st.integers(1, min(3, E)))
    seed = draw(st.integers(0, 2**16))
    bias = draw(st.booleans())
    kw = dict(num_tokens=T, num_experts=E, topk=K, seed=seed, ep_size=ep,
              scoring=draw(st.sampled_from(["softmax", "sigmoid"])),
              renormalize=draw(st.booleans()),
              dtype=draw(st.sampled_from(["fp32", "fp16", "bf16"])),
              hidden_size=draw(st.sampled_from([1, 3, 8, 20])),
              block_size=draw(st.sampled_from([1, 2, 8, 32])),
              logits=Generated(seed, draw(st.sampled_from(["normal", "uniform", "zeros",
                                                           "quantized"])),
                               draw(st.sampled_from([0.01, 1.0, 30.0]))),
              correction_bias=Generated(seed + 1, "normal", 0.3) if bias else None,
              max_tokens_per_rank=-(-T // ep) + draw(st.integers(0, 3)))
    if draw(st.booleans()):
        kw["expert_to_rank"] = tuple(draw(st.lists(st.integers(0, ep - 1), min_size=E,
                                                   max_size=E)))
    targets = ["gating_logits", "hidden_states"] + (["correction_bias"] if bias else [])
    kw["patches"] = tuple(draw(st.lists(st.builds(
        Patch, st.sampled_from(targets), st.sampled_from(["cell", "row", "column", "all"]),
        st.one_of(st.sampled_from(SPECIAL_VALUES), st.floats(-50, 50)),
        st.integers(0, 64), st.integers(0, 64)), max_size=3)))
    L = draw(st.integers(0, 3))
    kw["max_loras"] = L
    if L and draw(st.booleans()):
        kw["adapter_enabled"] = tuple(draw(st.lists(st.booleans(), min_size=L, max_size=L)))
    g = torch.Generator().manual_seed(seed)
    o = {}
    if draw(st.integers(0, 4)) == 0:
        o["topk_ids"] = torch.randint(-2, E + 2, (T, K), generator=g, dtype=I32)
        if draw(st.booleans()):
            o["topk_weights"] = torch.rand((T, K), generator=g)
    if draw(st.integers(0, 5)) == 0:
        M = kw["max_tokens_per_rank"]
        o["recv_counters"] = torch.randint(-2, M + 3, (ep, ep), generator=g, dtype=I32)
    if L and draw(st.booleans()):
        o["token_lora_mapping"] = torch.randint(-2, L + 2, (T,), generator=g, dtype=I32)
        if draw(st.booleans()):
            o["lora_ids"] = torch.randint(-1, L, (L + 1,), generator=g, dtype=I32)
    kw["overrides"] = Overrides(**o)
    faults = []
    for _ in range(draw(st.integers(0, 2))):
        boundary = draw(st.sampled_from(sorted(FAULT_TENSORS)))
        tensor = draw(st.sampled_from(sorted(FAULT_TENSORS[boundary])))
        kinds = [k for k in FAULT_KINDS
                 if not (k in ("nan", "inf") and FAULT_TENSORS[boundary][tensor] == "int")]
        faults.append(Fault(boundary, tensor, draw(st.sampled_from(kinds)),
                            tuple(draw(st.lists(st.integers(0, 50), max_size=2))),
                            draw(st.floats(0, 0.5)), draw(st.integers(0, 99)),
                            draw(st.integers(0, 31))))
    kw["faults"] = tuple(faults)
    return MoECase(**kw).validate()


@settings(max_examples=100, deadline=None)
@given(cases())
def test_fixed_chain_never_yields_a_finding(case):
    result = run(case)
    assert invariants.check(result) == []
