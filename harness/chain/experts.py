"""Stage 4, experts + finalize: a per-expert linear map over the block-aligned layout, then
unpermute and reduce with the top-k weights.

experts (a grouped GEMM of the fused-MoE kind): one CTA per block of `block_size` aligned
positions (grid.y), sized statically by `geometry.max_num_m_blocks` and launched in chunks of at
most 65535 blocks (`geometry.experts_chunks`; with `grid-y-overflow`, one launch over all of
them, which `geometry.validate` rejects with `LaunchConfigError` above 65535, vLLM PR 43599).
A CTA past `num_tokens_post_pad` exits; otherwise for every position p of its block whose
`sorted_token_ids[p]` is not the sentinel, row n = x // K of the hidden states is multiplied by
the weights of `expert_ids[block]`: expert_out[p] = hidden[n] @ W[e] (fp32 accumulate).
Positions never written keep poison.

finalize (TRT-LLM `finalizeMoeRoutingKernel`): one CTA per row n:
out[n] = sum over k of topk_weights[n, k] * expert_out[permuted_row[n*K + k]], skipping
entries whose permuted_row is -1. Reads through checked buffers: a garbage permuted_row is an
`IllegalAccess` in finalize, as the real incident's wild pointer.

Contract: the sort stage's outputs for the same ids (faults may corrupt them; a fixed kernel
still never reads out of bounds where its indices are in range).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.chain import StageContext


@dataclass(eq=False)
class ExpertsInput:
    """hidden_states [N, H]; expert_weights [E_l, H, H] fp32 (the rank's local experts);
    sorted_token_ids [max_num_tokens_padded] int32; expert_ids [max_num_m_blocks] int32;
    num_tokens_post_pad int; topk K; block_size."""

    hidden_states: torch.Tensor
    expert_weights: torch.Tensor
    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_pad: int
    topk: int
    block_size: int


@dataclass(eq=False)
class ExpertsOutput:
    """expert_out [max_num_tokens_padded, H] fp32 (poison where never written);
    num_launches: how many chunks the kernel was launched in."""

    expert_out: torch.Tensor
    num_launches: int


def experts_cpu(inp: ExpertsInput, ctx: StageContext) -> ExpertsOutput:
    raise NotImplementedError


@dataclass(eq=False)
class FinalizeInput:
    """expert_out [P, H] fp32; permuted_row [N*K] int32; topk_weights [N, K] fp32."""

    expert_out: torch.Tensor
    permuted_row: torch.Tensor
    topk_weights: torch.Tensor


def finalize_cpu(inp: FinalizeInput, ctx: StageContext) -> torch.Tensor:
    """[N, H] fp32."""
    raise NotImplementedError
