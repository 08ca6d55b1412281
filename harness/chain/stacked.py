"""Stacked runs: B same-shape cases through the CPU model as one run (the batch path).

The fuzzer's batches (`harness.fuzz.batch`) are a base case and siblings that differ only in
the tensor they enter the chain with (gating logits, or forged topk_ids). Every stage treats
tokens independently except dispatch (slots per source rank) and the two sorts (sort_align,
lora_align), which lay the (token, slot) pairs out by expert. A stack of B cases without
expert parallelism is itself a case, `stack_case`: B*T tokens on B source ranks (case b's
tokens are source b's, so each keeps its own receive slots, padding and counters), every
expert owned by rank 0; from the sorts on, case b's expert e is expert b*E + e of B*E (its
weights repeated), so the stable counting sorts lay the cases out one after another, each
exactly as its own run would. One pass of the CPU model (one call per stage, ops over B*T rows)
computes what B runs compute, and `harness.invariants.check` over the stack's `RunResult`
judges all B cases at once: row by row, slot by slot, segment by segment (a defect in one
case's part is a defect of the stack). Ranks 1..B-1 receive nothing and are not run (their
finalize output is zero, as it would be).

Where no case has a padding receive slot (as many slots as tokens, every token sent), one rank
with B*T slots is the cheaper stack (`stack_case` with `ranks` False): token t of case b in slot
b*T + t. Which cases stack (`unstackable` says why not): no expert parallelism; faults at the
gating boundary only (applied to each case's rows); no forged recv_counters or LoRA inputs; the
sort's path per case is the single block's or its variant is off; one experts launch per case;
the stack's buffers within `max_batch`. Launches are validated per case (a stack's grids are
larger than any of its cases').
"""

from __future__ import annotations

import dataclasses
import math

import torch

from harness import geometry
from harness.bugs import BugSet
from harness.case import Materialized, MoECase, Overrides, materialize
from harness.chain import StageContext
from harness.chain.dispatch import CombineInput, DispatchInput, combine_cpu, dispatch_cpu
from harness.chain.experts import ExpertsInput, FinalizeInput, experts_over_chunks, finalize_cpu
from harness.chain.faults import apply_fault
from harness.chain.gating import GatingInput, GatingOutput, gating_cpu
from harness.chain.lora_align import LoraAlignInput, lora_align_cpu
from harness.chain.result import RankRun, RunResult
from harness.chain.runner import _call, _Stop, chain_mode, recv_garbage
from harness.chain.sort_align import SortAlignInput, sort_align_cpu
from harness.memory import vary_poison

#: elements of the B-rank layout's receive buffers (B*B*M slots) and of the repeated expert
#: weights (B*E*H*H): beyond, stacking costs more than it saves
MAX_STACKED_SLOTS = 1 << 20
MAX_STACKED_WEIGHTS = 1 << 22


def unstackable(case: MoECase, bugs: BugSet, batch: int) -> str | None:
    """Why `batch` cases of `case`'s shape cannot run as one stack (None: they can)."""
    T, E, K, H, bs = (case.num_tokens, case.num_experts, case.topk, case.hidden_size,
                      case.block_size)
    o = case.overrides
    if case.ep_size != 1:
        return "expert parallelism"
    if any(f.boundary != "gating" for f in case.faults):
        return "faults after gating"
    if o.recv_counters is not None or o.token_lora_mapping is not None \
            or o.lora_ids is not None:
        return "forged recv_counters or LoRA inputs"
    if o.topk_ids is not None and o.gating_logits is not None:
        return "forged logits and ids"
    if geometry.sort_uses_three_step(T) and bugs.on("sort-duplicate-break"):
        return "three-step sort with sort-duplicate-break"
    chunked = not bugs.on("grid-y-overflow")
    if len(geometry.experts_chunks(T, K, E, bs, chunked=chunked)) != 1:
        return "several experts launches"
    if batch > max_batch(case):
        return "stack too large"
    try:
        geometry.validate(geometry.gating_launches(T, E))
        geometry.validate(geometry.experts_launches(T, K, E, bs, H, chunked=chunked))
    except Exception:  # a launch that fails fails alone: let the case show it
        return "a launch fails"
    return None


def max_batch(case: MoECase) -> int:
    """The most cases of `case`'s shape one stack holds (`MAX_STACKED_SLOTS`,
    `MAX_STACKED_WEIGHTS`)."""
    slots = case.recv_slots * max(case.topk, case.hidden_size)
    weights = case.num_experts * case.hidden_size ** 2
    return max(1, min(math.isqrt(MAX_STACKED_SLOTS // slots), MAX_STACKED_WEIGHTS // weights))


def entry(case: MoECase) -> str:
    """The tensor a stack's cases differ in: "topk_ids" (entering there) or "gating_logits"."""
    return "topk_ids" if case.overrides.topk_ids is not None else "gating_logits"


def sibling(case: MoECase, varied: torch.Tensor) -> MoECase:
    """`case` with its entry tensor (`entry`) replaced by `varied` ([T, E] logits or [T, K]
    ids): one case of a stack, as a case of its own (logits patches dropped: they are in
    `varied` already)."""
    if entry(case) == "topk_ids":
        return dataclasses.replace(case, overrides=dataclasses.replace(
            case.overrides, topk_ids=varied.to(torch.int32).clone()))
    return dataclasses.replace(
        case, patches=tuple(p for p in case.patches if p.target != "gating_logits"),
        overrides=dataclasses.replace(case.overrides, gating_logits=varied.clone()))


def stack_case(case: MoECase, varied: torch.Tensor, ranks: bool = False) -> MoECase:
    """The stack of `case` with each of `varied` [B, ...] as its entry tensor, as one case of
    B*T tokens. `ranks` False: one rank with B*T receive slots (faithful when `case` has as
    many slots as tokens and every token is sent: token t of case b lands in slot b*T + t).
    True: B source ranks (case b's tokens are source b's, with its own M slots, padding and
    counter), rank 0 owning every expert; buffers B*B*M."""
    B, T = varied.shape[0], case.num_tokens
    o = case.overrides
    if entry(case) == "topk_ids":
        weights = None if o.topk_weights is None else o.topk_weights.repeat(B, 1)
        over = Overrides(topk_ids=varied.reshape(B * T, -1).to(torch.int32),
                         topk_weights=weights)
    else:
        over = Overrides(gating_logits=varied.reshape(B * T, -1))
    layout = {"ep_size": B, "expert_to_rank": (0,) * case.num_experts,
              "max_tokens_per_rank": case.recv_slots} if ranks else \
        {"ep_size": 1, "expert_to_rank": None, "max_tokens_per_rank": None}
    return dataclasses.replace(
        case, num_tokens=B * T, overrides=over,
        patches=tuple(p for p in case.patches if p.target != "gating_logits"), **layout)


def _offset_ids(ids: torch.Tensor, rows: int, E: int, B: int) -> torch.Tensor:
    """ids [B*rows, K] -> the stack's: case b's id e in [0, E) becomes b*E + e; negatives stay;
    ids >= E move past B*E (still out of range)."""
    case_of_row = torch.arange(B * rows, dtype=torch.int32).div_(rows, rounding_mode="floor")
    base = (case_of_row * E).view(-1, 1)
    ids = ids.to(torch.int32)
    return torch.where(ids < 0, ids, torch.where(ids < E, ids + base, ids + (B - 1) * E))


def run_stacked(case: MoECase, varied: torch.Tensor, bugs: BugSet, target_name: str = "cpu",
                tensors: Materialized | None = None) -> RunResult:
    """Run the B cases of `case` with each of `varied` [B, ...] as its entry tensor as one
    stack on the CPU model (check `unstackable` first); `tensors`: `case`'s, if the caller has
    them. Returns the stack's `RunResult` (its case is `stack_case`)."""
    B = varied.shape[0]
    vary_poison(case.seed)
    with chain_mode():
        t = materialize(case) if tensors is None else tensors
        big = stack_case(case, varied.to(t.gating_logits.dtype) if entry(case) ==
                         "gating_logits" else varied)
        logits = big.overrides.gating_logits
        mapping = None if t.token_lora_mapping is None else t.token_lora_mapping.repeat(B)
        stacked = Materialized(t.gating_logits.repeat(B, 1) if logits is None else logits,
                               t.correction_bias, t.hidden_states.repeat(B, 1),
                               t.expert_weights, mapping, t.lora_ids, t.adapter_enabled)
        res = RunResult(big, bugs, target_name, stacked)
        ctx = StageContext(bugs=bugs, coverage=res.coverage)
        try:
            _run(res, ctx, case, B)
        except _Stop:
            pass
    return res


def _run(res: RunResult, ctx: StageContext, case: MoECase, B: int) -> None:
    t, big = res.tensors, res.case
    T, E, K, bs, H = (case.num_tokens, case.num_experts, case.topk, case.block_size,
                      case.hidden_size)
    M, N = case.recv_slots, B * case.recv_slots
    o = big.overrides
    if o.topk_ids is None:
        res.gating_in = GatingInput(t.gating_logits, t.correction_bias, K, case.scoring,
                                    case.renormalize)
        res.gating_out = _call(res, "gating", gating_cpu, res.gating_in, ctx)
        routed = res.gating_out
    else:
        weights = o.topk_weights if o.topk_weights is not None else \
            torch.full((B * T, K), 1.0 / K)
        routed = GatingOutput(o.topk_ids.clone(), weights.to(torch.float32).clone())
    changes: dict[str, torch.Tensor] = {}
    for f in case.faults:  # each case's rows, as the runner corrupts them alone
        changes[f.tensor] = apply_fault(changes.get(f.tensor, getattr(routed, f.tensor)), f, B)
    routed = dataclasses.replace(routed, **changes)

    if case.max_loras > 0:
        res.lora_in = LoraAlignInput(_offset_ids(routed.topk_ids, T, E, B),
                                     t.token_lora_mapping, t.lora_ids, t.adapter_enabled,
                                     B * E, bs, case.max_loras)
        res.lora_out = _call(res, "lora_align", lora_align_cpu, res.lora_in, ctx, B)

    # one rank where that is faithful (no padding slot anywhere), else B source ranks
    ids = routed.topk_ids
    ranks = M != T or not bool(((ids >= 0) & (ids < E)).any(1).all())
    res.case = big = stack_case(case, big.overrides.topk_ids.view(B, T, K)
                                if o.topk_ids is not None else
                                big.overrides.gating_logits.view(B, T, -1), ranks)
    S = B if ranks else 1  # source ranks (= ranks) of the stack
    garbage = recv_garbage(case)  # each case's own stale slots
    garbage = garbage.expand(B, B, M, K) if ranks else garbage.repeat(1, 1, B, 1)
    res.dispatch_in = DispatchInput(ids, routed.topk_weights, t.hidden_states,
                                    torch.zeros(E, dtype=torch.int32), S, N if not ranks else M,
                                    garbage, None)
    res.dispatch_out = _call(res, "dispatch", dispatch_cpu, res.dispatch_in, ctx)
    recv = res.dispatch_out

    rr = RankRun(0)
    res.ranks.append(rr)
    rr.sort_in = SortAlignInput(_offset_ids(recv.recv_topk_ids[0].reshape(N, K), M, E, B),
                                torch.arange(B * E, dtype=torch.int32), B * E, bs)
    rr.sort_out = _call(res, "sort_align", sort_align_cpu, rr.sort_in, ctx, B)
    aligned = rr.sort_out
    rr.experts_in = ExpertsInput(recv.recv_hidden[0].reshape(N, H),
                                 t.expert_weights.repeat(B, 1, 1), aligned.sorted_token_ids,
                                 aligned.expert_ids, aligned.num_tokens_post_pad, K, bs)
    blocks = geometry.max_num_m_blocks(N, K, B * E, bs)
    rr.experts_out = _call(res, "experts", experts_over_chunks, rr.experts_in, ctx,
                           [(0, blocks)])
    rr.finalize_in = FinalizeInput(rr.experts_out.expert_out, aligned.permuted_row,
                                   recv.recv_topk_weights[0].reshape(N, K))
    rr.finalize_out = _call(res, "finalize", finalize_cpu, rr.finalize_in, ctx)
    outputs = torch.zeros((S, N, H), dtype=torch.float32)  # ranks 1..S-1 received nothing
    outputs[0] = rr.finalize_out
    combine_in = CombineInput(outputs, recv.recv_token_index, recv.recv_counters, B * T)
    res.output = _call(res, "combine", combine_cpu, combine_in, ctx)
