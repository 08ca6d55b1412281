"""Stage 5 (beside the chain), LoRA align: the block-aligned layout of each adapter's tokens.

Models vLLM's `moe_lora_align_block_size` (csrc/moe/moe_align_sum_kernels.cu): `lora_ids`
lists the active adapters in max_loras + 1 slots (-1, the base model, usually first; unused
slots -1). Two kernels are launched with one block per slot:
1. align: lora_id = lora_ids[slot]; skip when lora_id == -1, lora_id >= max_loras (or < -1) or
   adapter_enabled[lora_id] == 0; else count the (token, k) pairs of the tokens whose
   `token_lora_mapping` is lora_id, per expert, and write that adapter's row of `expert_ids`,
   `num_tokens_post_pad[lora_id]` and the per-expert aligned offsets into a workspace
   `cumsum` [max_loras, E + 1] (never written for skipped adapters: poison);
2. count-and-sort: same skip test; scatter every pair into
   `sorted_token_ids[lora_id, cumsum[lora_id, e] + rank]` (sentinel T*K in padding).

Fixed (vLLM PR 40131): max_loras + 1 blocks; the `lora_id >= max_loras` guard; the sort kernel
checks `adapter_enabled`. Variants: `lora-grid-off-by-one` launches max_loras blocks (the last
slot is never processed); `lora-id-unchecked` drops the range guard (adapter_enabled and the
output rows are indexed out of bounds); `lora-disabled-adapter` drops the sort kernel's
adapter_enabled check (it scatters with a disabled adapter's never-written offsets).

Outputs start as poison; rows of adapters that are absent or disabled stay untouched.
Contract: lora_ids in [-1, max_loras), no duplicates; topk_ids in [0, E) (others skipped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.chain import StageContext


@dataclass(eq=False)
class LoraAlignInput:
    """topk_ids [T, K] int32 global ids; token_lora_mapping [T] int32; lora_ids
    [max_loras + 1] int32; adapter_enabled [max_loras + 1] int32; num_experts E; block_size;
    max_loras."""

    topk_ids: torch.Tensor
    token_lora_mapping: torch.Tensor
    lora_ids: torch.Tensor
    adapter_enabled: torch.Tensor
    num_experts: int
    block_size: int
    max_loras: int


@dataclass(eq=False)
class LoraAlignOutput:
    """sorted_token_ids [max_loras, max_num_tokens_padded(T, K, E, bs)] int32;
    expert_ids [max_loras, max_num_m_blocks] int32; num_tokens_post_pad [max_loras] int32.
    Rows of adapters not processed hold poison."""

    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_pad: torch.Tensor


def lora_align_cpu(inp: LoraAlignInput, ctx: StageContext) -> LoraAlignOutput:
    raise NotImplementedError
