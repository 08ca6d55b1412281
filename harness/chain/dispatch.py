"""Stage 2, all-to-all dispatch + sanitize, and the combine that undoes it.

Simulates `ep_size` ranks of an expert-parallel all-to-all (as FlashInfer's TRT-LLM MoeAlltoAll
that SGLang uses). Source rank s owns tokens [s*P, min((s+1)*P, T)), P = ceil(T / ep_size).
Every destination rank r receives, from every source s, the tokens of s that route at least
one of their K ids to an expert r owns, in token order, into slots [0, count) of its receive
buffer [ep_size (src), max_tokens_per_rank, ...]; `recv_counters[r, s] = count`. Slots beyond
the count are padding: their expert ids hold garbage (memory of an earlier step), their weights
garbage, their hidden rows and token indices are never written.

Sanitize (`a2a_sanitize` kernel, SGLang PR 24850) sets the expert ids of every padding slot to
-1, the invalid id the downstream stages skip. Defensive: counters are clamped to
[0, max_tokens_per_rank]. With `a2a-unsanitized-padding` sanitize is skipped.

Contract: topk_ids in [0, E) or -1 (ids outside are not owned by any rank: never sent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness import geometry
from harness.chain import StageContext
from harness.memory import CheckedBuffer, framed

STAGE = "dispatch"


@dataclass(eq=False)
class DispatchInput:
    """topk_ids [T, K] int32; topk_weights [T, K] fp32; hidden_states [T, H];
    rank_of_expert [E] int32; recv_garbage [ep, ep, M, K] int32 (what padding slots hold
    before sanitize); recv_counters_override [ep, ep] int32 or None (counters as reported by
    the senders, replacing the true counts)."""

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    hidden_states: torch.Tensor
    rank_of_expert: torch.Tensor
    ep_size: int
    max_tokens_per_rank: int
    recv_garbage: torch.Tensor
    recv_counters_override: torch.Tensor | None = None


@dataclass(eq=False)
class DispatchOutput:
    """Receive buffers of all ranks, indexed [dst, src, slot, ...]:
    recv_topk_ids [ep, ep, M, K] int32 (global ids; -1 in sanitized padding);
    recv_topk_weights [ep, ep, M, K] fp32; recv_hidden [ep, ep, M, H] (input dtype; padding
    poison); recv_token_index [ep, ep, M] int32 (source token of a slot; padding poison);
    recv_counters [ep, ep] int32."""

    recv_topk_ids: torch.Tensor
    recv_topk_weights: torch.Tensor
    recv_hidden: torch.Tensor
    recv_token_index: torch.Tensor
    recv_counters: torch.Tensor


def _owners(inp: DispatchInput) -> torch.Tensor:
    """[T, K] int64: the rank owning each id; `ep_size` ("nobody") for ids outside [0, E) or
    whose owner is outside [0, ep).

    Ids are clamped onto two "nobody" entries framing `rank_of_expert`, so no id, however wild,
    indexes it out of bounds."""
    ep, E = inp.ep_size, inp.rank_of_expert.numel()
    # [0, ep) stays, anything else becomes ep (-1 wraps round to ep)
    owner = inp.rank_of_expert.to(torch.int64).clamp(-1, ep).remainder(ep + 1)
    index = (inp.topk_ids.clamp(-1, E) + 1).reshape(-1)
    return framed(owner, ep).index_select(0, index).view(inp.topk_ids.shape)


def dispatch_cpu(inp: DispatchInput, ctx: StageContext) -> DispatchOutput:
    """Dispatch, then sanitize (skipped with `a2a-unsanitized-padding`)."""
    T, K = inp.topk_ids.shape
    H = inp.hidden_states.shape[1]
    ep, M = inp.ep_size, inp.max_tokens_per_rank
    launches = geometry.validate(geometry.dispatch_launches(ep, M))
    bufs = _buffers(inp)
    sent = _send_all_to_one_rank(inp, bufs) if ep == 1 and M >= T else None
    if sent is None:
        sent = _send(inp, ctx, bufs)
    true_counts, unowned, unsent, one = sent
    recv_ids, recv_tok = bufs[0].view(ep, ep, M, K), bufs[3].view(ep, ep, M)

    counters = true_counts.clone(memory_format=torch.contiguous_format)
    if inp.recv_counters_override is not None:  # what the senders reported instead
        counters = inp.recv_counters_override.to(torch.int32).reshape(ep, ep).clone()
        disagree, low, high = torch.stack([
            (counters != true_counts).count_nonzero(), (counters < 0).count_nonzero(),
            (counters > M).count_nonzero()]).tolist()
        ctx.cover("dispatch.counters_overridden")
        ctx.cover("dispatch.counters_disagree", disagree)
        ctx.cover("dispatch.counter_clamped_low", low)
        ctx.cover("dispatch.counter_clamped_high", high)

    # a2a_sanitize: one thread per (dst, src, slot) over grid (ceil(M / 256), ep, ep); the
    # counter is clamped to [0, M] before it bounds anything
    limit = counters.clamp(0, M)
    sanitize = not ctx.bugs.on("a2a-unsanitized-padding")
    if ep == 1 and inp.recv_counters_override is None:  # one buffer: its tail is the padding
        kept = int(limit)
        if sanitize:
            recv_ids.view(M, K)[kept:] = -1
        empty = int(int(true_counts) == 0)
    else:
        padding = torch.arange(M, dtype=torch.int32) >= limit[..., None]
        if sanitize:
            recv_ids[padding] = -1
        empty, kept = torch.stack([(true_counts.sum(1) == 0).count_nonzero(),
                                   limit.sum()]).tolist()
    if sanitize:
        ctx.cover("dispatch.sanitize_launches", len(launches))

    stats = {"padding_slots": ep * ep * M - kept, "unowned_ids": unowned,
             "tokens_unsent": unsent, "tokens_multi_rank": T - unsent - one,
             "empty_ranks": empty}
    if sanitize:
        stats["sanitized_slots"] = stats["padding_slots"]
    for name, n in stats.items():
        ctx.cover(f"dispatch.{name}", n)
    return DispatchOutput(recv_ids, bufs[1].view(ep, ep, M, K), bufs[2].view(ep, ep, M, H),
                          recv_tok, counters)


_Buffers = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
#: (true recv counters [dst, src], unowned ids, tokens sent nowhere, tokens sent to one rank)
_Sent = tuple[torch.Tensor, int, int, int]


def _buffers(inp: DispatchInput) -> _Buffers:
    """The flat receive buffers (ids, weights, hidden, token index), as an earlier step left
    them: padding keeps stale ids and weights, or poison."""
    ep, M, K = inp.ep_size, inp.max_tokens_per_rank, inp.topk_ids.shape[1]
    H = inp.hidden_states.shape[1]
    return (CheckedBuffer(STAGE, "recv_topk_ids", ep * ep * M * K, torch.int32,
                          fill=inp.recv_garbage.to(torch.int32)).data,
            CheckedBuffer(STAGE, "recv_topk_weights", ep * ep * M * K, torch.float32,
                          fill=inp.recv_garbage * 2**-10).data,  # stale weights: finite garbage
            CheckedBuffer(STAGE, "recv_hidden", ep * ep * M * H, inp.hidden_states.dtype).data,
            CheckedBuffer(STAGE, "recv_token_index", ep * ep * M, torch.int32).data)


def _send_all_to_one_rank(inp: DispatchInput, bufs: _Buffers) -> _Sent | None:
    """`_send` without expert parallelism where rank 0 owns every id and has a slot for every
    token (M >= T): token t lands in slot t, so the scatters are prefix copies. None when an
    id is not owned (the general `_send` then decides who gets what)."""
    T, K = inp.topk_ids.shape
    lo, hi = torch.aminmax(inp.topk_ids)
    if int(lo) < 0 or int(hi) >= inp.rank_of_expert.numel() or bool(inp.rank_of_expert.any()):
        return None
    bufs[0][:T * K] = inp.topk_ids.reshape(-1)
    bufs[1][:T * K] = inp.topk_weights.reshape(-1)
    bufs[2][:inp.hidden_states.numel()] = inp.hidden_states.reshape(-1)
    torch.arange(T, out=bufs[3][:T])
    return torch.full((1, 1), T, dtype=torch.int32), 0, 0, T


def _send(inp: DispatchInput, ctx: StageContext, bufs: _Buffers) -> _Sent:
    """The senders: token t of source s goes to every rank owning one of its ids, into the
    slot of the running count of the tokens s sent to that rank; rows, weights, hidden rows
    and token indices are scattered into the receive buffers."""
    T, K = inp.topk_ids.shape
    H = inp.hidden_states.shape[1]
    ep, M = inp.ep_size, inp.max_tokens_per_rank
    P = -(-T // ep)
    owner = _owners(inp)  # column ep: nobody
    sent = torch.zeros((ep * P, ep + 1), dtype=torch.bool)
    sent[:T].scatter_(1, owner, True)
    sent = sent[:, :ep].reshape(ep, P, ep)  # [src, token of src, dst]
    slots = sent.cumsum(1, dtype=torch.int32)
    true_counts = slots[:, -1].t()  # [dst, src]
    token, dst = sent.view(ep * P, ep).nonzero().unbind(1)  # in token order per (src, dst)
    src = token // P
    slot = slots.view(ep * P, ep)[token, dst] - 1
    if M < P:  # a receive buffer too small for a source's tokens: the extra are dropped
        fits = (slot < M).nonzero().squeeze(1)
        ctx.cover("dispatch.slot_overflow", slot.numel() - fits.numel())
        src, dst, slot, token = (t.index_select(0, fits) for t in (src, dst, slot, token))
    row = (dst * ep + src) * M + slot  # flat [dst, src, slot]
    # the scatter indices are the stage's own, in range by construction
    ids, w, h, tok = bufs
    ids.view(-1, K).index_copy_(0, row, inp.topk_ids.index_select(0, token).to(torch.int32))
    w.view(-1, K).index_copy_(0, row, inp.topk_weights.index_select(0, token).float())
    h.view(-1, H).index_copy_(0, row, inp.hidden_states.index_select(0, token))
    tok.index_copy_(0, row, token.to(torch.int32))
    ranks_per_token = torch.bincount(sent.sum(2).view(-1)[:T], minlength=2)
    unowned, unsent, one = torch.cat([(owner == ep).count_nonzero().view(1),
                                      ranks_per_token[:2]]).tolist()
    return true_counts, unowned, unsent, one


@dataclass(eq=False)
class CombineInput:
    """rank_outputs [ep, ep*M, H] fp32 (finalize output of each destination rank, one row per
    receive slot); recv_token_index [ep, ep, M] int32; recv_counters [ep, ep] int32."""

    rank_outputs: torch.Tensor
    recv_token_index: torch.Tensor
    recv_counters: torch.Tensor
    num_tokens: int


def combine_cpu(inp: CombineInput, ctx: StageContext) -> torch.Tensor:
    """[T, H] fp32: each token's output summed over the ranks it was sent to (real slots only,
    counters clamped to [0, M] as sanitize clamps them)."""
    ep, _, M = inp.recv_token_index.shape
    H, T = inp.rank_outputs.shape[-1], inp.num_tokens
    limit = inp.recv_counters.long().reshape(ep, ep).clamp(0, M)
    real = torch.arange(M) < limit[..., None]  # [dst, src, slot]
    token = inp.recv_token_index.long()
    # defensive: a slot whose token index is outside [0, T) (poison after a fault) is skipped
    ok = real & (token >= 0) & (token < T)
    rows = ok.reshape(-1).nonzero().squeeze(1)
    n_real = int(real.count_nonzero())
    ctx.cover("combine.slots", n_real)
    ctx.cover("combine.bad_token_index", n_real - rows.numel())
    out = torch.zeros((T, H), dtype=torch.float32)
    out.index_add_(0, token.reshape(-1).index_select(0, rows),
                   inp.rank_outputs.reshape(ep * ep * M, H).index_select(0, rows).float())
    return out
