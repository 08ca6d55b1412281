"""A stack of B cases computes and finds exactly what the B cases alone do (chain.stacked)."""

from __future__ import annotations

import random

import pytest
import torch

from harness import invariants
from harness.api import execute
from harness.backends.cpu import CpuTarget
from harness.bugs import VARIANTS, BugSet
from harness.case import Fault, MoECase, Overrides, Patch, materialize
from harness.chain import stacked
from harness.chain.runner import chain_mode
from harness.fuzz import codec
from harness.fuzz.batch import derive_ids, derive_logits

CASES = {
    "small": MoECase(16, 8, 2, seed=1, hidden_size=8),
    "renorm-bias": MoECase(24, 64, 6, seed=2, renormalize=True, hidden_size=4,
                           correction_bias=torch.linspace(-1, 1, 64)),
    "fallback-sigmoid": MoECase(9, 320, 8, seed=3, scoring="sigmoid", hidden_size=2,
                                block_size=4),
    "fp16-nan-rows": MoECase(32, 16, 4, seed=4, dtype="fp16", hidden_size=8,
                             patches=(Patch("gating_logits", "row", "nan", row=3),)),
    "bf16-block1": MoECase(12, 6, 3, seed=5, dtype="bf16", block_size=1, hidden_size=3),
    "padding-slots": MoECase(10, 8, 2, seed=6, max_tokens_per_rank=16, hidden_size=4),
    "lora": MoECase(20, 16, 2, seed=7, max_loras=3, hidden_size=4),
    "lora-disabled": MoECase(20, 16, 2, seed=8, max_loras=4, hidden_size=4,
                             adapter_enabled=(True, False, True, True)),
    "ids-entry": MoECase(16, 8, 2, seed=9, hidden_size=4, overrides=Overrides(
        topk_ids=torch.randint(0, 8, (16, 2), generator=torch.Generator().manual_seed(9),
                               dtype=torch.int32))),
    "three-step": MoECase(300, 8, 2, seed=10, hidden_size=2),
    "gating-faults": MoECase(16, 8, 4, seed=11, hidden_size=2, faults=(
        Fault("gating", "topk_ids", "garbage", rows=(), fraction=0.25, seed=3),
        Fault("gating", "topk_weights", "stale", rows=(1, 5)),
        Fault("gating", "topk_ids", "duplicate", rows=(7,)))),
    "gating-fault-bitflip": MoECase(8, 8, 2, seed=12, hidden_size=2, max_loras=2, faults=(
        Fault("gating", "topk_weights", "bitflip", rows=(2,), bit=31),
        Fault("gating", "topk_ids", "drop", rows=(0, 3)))),
}
BUGSETS = [(), *[(v,) for v in VARIANTS]]


def varied_for(case: MoECase, batch: int, seed: int) -> torch.Tensor:
    if stacked.entry(case) == "topk_ids":
        return derive_ids(case.overrides.topk_ids, case.num_experts, batch, seed)
    with chain_mode():
        return derive_logits(materialize(case).gating_logits, batch, seed)


def stack_vs_alone(case: MoECase, bugs: BugSet, batch: int, seed: int) -> None:
    assert stacked.unstackable(case, bugs, batch) is None
    varied = varied_for(case, batch, seed)
    res = stacked.run_stacked(case, varied, bugs)
    with chain_mode():
        res.findings = invariants.check(res)
    got = {f.signature for f in res.findings}
    alone = [execute(stacked.sibling(case, varied[b]) if b else case, CpuTarget(), bugs)
             for b in range(batch)]
    want = {f.signature for r in alone for f in r.findings}
    assert got == want, (got, want)
    if res.ranks and res.ranks[0].sort_out is not None:
        for b, r in enumerate(alone):
            if r.ranks and r.ranks[0].sort_out is not None:
                same_sort_segment(res.ranks[0].sort_out, r.ranks[0].sort_out, b, batch,
                                  case.num_experts)
    if res.output is not None and all(r.output is not None for r in alone):
        T = case.num_tokens
        for b, r in enumerate(alone):
            torch.testing.assert_close(res.output[b * T:(b + 1) * T], r.output, rtol=0,
                                       atol=0, equal_nan=True)


def same_sort_segment(stack, alone, b: int, batch: int, E: int) -> None:
    """Case b's part of the stack's sort is its own sort, offset: counts, the aligned layout
    (positions + the earlier cases' total, rows + b*N*K, sentinel N*K -> B*N*K)."""
    NK = alone.permuted_row.numel()
    assert torch.equal(stack.expert_counts[b * E:(b + 1) * E], alone.expert_counts)
    start = int(stack.aligned_offsets[b * E])
    n = alone.num_tokens_post_pad
    assert int(stack.aligned_offsets[(b + 1) * E]) - start == n
    got = stack.sorted_token_ids[start:start + n].long()
    want = alone.sorted_token_ids[:n].long()
    want = torch.where(want == NK, batch * NK, want + b * NK)
    assert torch.equal(got, want)
    perm = alone.permuted_row.long()
    assert torch.equal(stack.permuted_row[b * NK:(b + 1) * NK].long(),
                       torch.where(perm >= 0, perm + start, perm))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("bugs", BUGSETS, ids=lambda b: "+".join(b) or "fixed")
def test_stack_finds_what_its_cases_find_alone(name, bugs):
    case, bugset = CASES[name], BugSet.of(bugs)
    if stacked.unstackable(case, bugset, 6) is not None:
        pytest.skip(stacked.unstackable(case, bugset, 6))
    stack_vs_alone(case, bugset, 6, seed=len(name))


def test_decoded_cases_stack_like_alone():
    """Random fuzz inputs (the decoder's variety) that stack: same findings, same outputs."""
    rng = random.Random(5)
    done = 0
    while done < 12:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(8, 200)))
        case = codec.decode(data, codec.LIMITS)
        if case.num_tokens > 64 or stacked.unstackable(case, BugSet(), 4) is not None:
            continue
        bugs = BugSet.of(rng.sample(list(VARIANTS), rng.randrange(0, 3)))
        if stacked.unstackable(case, bugs, 4) is None:
            stack_vs_alone(case, bugs, 4, seed=done)
            done += 1


def test_one_rank_layout_needs_every_token_sent():
    """Forged ids that send a token nowhere: the stack takes B source ranks, and still agrees."""
    ids = torch.tensor([[0, 1], [-1, -1], [2, 3], [9, -1]], dtype=torch.int32)
    case = MoECase(4, 8, 2, seed=1, hidden_size=2, overrides=Overrides(topk_ids=ids))
    varied = torch.stack([ids, ids.flip(0), ids])
    res = stacked.run_stacked(case, varied, BugSet())
    assert res.case.ep_size == 3 and res.case.max_tokens_per_rank == 4
    stack_vs_alone(case, BugSet(), 3, seed=0)


@pytest.mark.parametrize("case,why", [
    (MoECase(16, 8, 2, ep_size=2), "expert parallelism"),
    (MoECase(16, 8, 2, faults=(Fault("dispatch", "recv_topk_ids", "garbage"),)),
     "faults after gating"),
    (MoECase(300, 8, 2), None),
])
def test_unstackable_reasons(case, why):
    assert stacked.unstackable(case, BugSet(), 4) == why


def test_three_step_with_duplicate_break_does_not_stack():
    assert stacked.unstackable(MoECase(300, 8, 2), BugSet.of(["sort-duplicate-break"]), 4) \
        == "three-step sort with sort-duplicate-break"
