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

from harness.chain import StageContext


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


def dispatch_cpu(inp: DispatchInput, ctx: StageContext) -> DispatchOutput:
    """Dispatch, then sanitize (skipped with `a2a-unsanitized-padding`)."""
    raise NotImplementedError


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
    raise NotImplementedError
