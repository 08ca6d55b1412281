"""Stage 3, sort/align: group the (token, slot) pairs by expert, both ways, block-aligned.

Models FlashInfer/TRT-LLM's routing sort and vLLM's `moe_align_block_size`. Rows are the N
receive slots of one rank (N = T without expert parallelism); the expanded row of (n, k) is
x = n*K + k. Global ids are mapped to the rank's local ids through `expert_map`; ids of -1,
outside [0, E) or not owned (map -1) are skipped.

Outputs, for the E_l local experts: per-expert counts and exclusive prefix sums; the
block-aligned layout, each expert's rows padded to a multiple of `block_size` (aligned
offsets, `num_tokens_post_pad`), `sorted_token_ids` (aligned position -> expanded row,
sentinel N*K in padding), `expert_ids` per block of `block_size` positions; and
`permuted_row` (expanded row -> aligned position, -1 where skipped), the permutation finalize
reads. Within an expert rows are ordered by expanded row (a stable sort), on both paths.

Paths: N <= 256, a single block counts, scans and scatters; N > 256, the three-step path
(FlashInfer `blockExpertPrefixSumKernel`, global prefix, merge): blocks of 256 rows, each
computing per expert a block-local exclusive scan of "row n has expert e", then a global prefix
over (expert, block), then a merge writing each pair's position. Fixed: a row's multiplicity
for e is counted (duplicate ids get consecutive positions). With `sort-duplicate-break` the
per-row search `break`s at the first matching slot: a duplicate slot is neither counted nor
written, and its `permuted_row` entry keeps whatever memory held (poison).

Contract: any int32 ids (out-of-range and -1 skipped); duplicates handled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.chain import StageContext


@dataclass(eq=False)
class SortAlignInput:
    """topk_ids [N, K] int32 global ids; expert_map [E] int32 (global -> local, -1 = not
    owned); num_local_experts E_l; block_size."""

    topk_ids: torch.Tensor
    expert_map: torch.Tensor
    num_local_experts: int
    block_size: int


@dataclass(eq=False)
class SortAlignOutput:
    """expert_counts [E_l] int32; expert_offsets [E_l + 1] int32 (exclusive prefix);
    aligned_offsets [E_l + 1] int32 (block-aligned exclusive prefix; last = num_tokens_post_pad);
    permuted_row [N*K] int32 (-1 where skipped); sorted_token_ids [max_num_tokens_padded]
    int32 (sentinel N*K); expert_ids [max_num_m_blocks] int32 (-1 past num_tokens_post_pad);
    num_tokens_post_pad int."""

    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor
    aligned_offsets: torch.Tensor
    permuted_row: torch.Tensor
    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_pad: int


def sort_align_cpu(inp: SortAlignInput, ctx: StageContext) -> SortAlignOutput:
    raise NotImplementedError
