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

from harness import geometry
from harness.chain import StageContext
from harness.memory import CheckedBuffer, framed

STAGE = "sort_align"


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


def _local_ids(inp: SortAlignInput) -> torch.Tensor:
    """[N*K] int32 local expert id of every expanded row; E_l (a bucket past every expert)
    where the pair is skipped.

    The kernel's guard `if (id < 0 || id >= E) skip` comes before `expert_map` is dereferenced:
    ids are clamped onto two "skipped" entries framing the map, so no id, however wild, reads
    outside it. A map entry outside [0, E_l) (-1: not owned) counts as not owned."""
    flat = inp.topk_ids.reshape(-1)
    E, E_l = inp.expert_map.numel(), inp.num_local_experts
    # [0, E_l) stays, anything else becomes E_l (-1 wraps round to E_l)
    entry = inp.expert_map.to(torch.int32).clamp(-1, E_l).remainder(E_l + 1)
    return framed(entry, E_l).index_select(0, flat.clamp(-1, E) + 1)


def _cover_skips(inp: SortAlignInput, ctx: StageContext, skipped: int) -> None:
    """Why pairs were skipped (computed only where some were); not_owned includes map
    entries outside [0, E_l)."""
    flat = inp.topk_ids.reshape(-1)
    in_range = (flat >= 0) & (flat < inp.expert_map.numel())
    minus_one, n_in_range = torch.stack([(flat == -1).sum(), in_range.sum()]).tolist()
    ctx.cover("sort_align.skip.invalid_id", minus_one)
    ctx.cover("sort_align.skip.out_of_range", flat.numel() - n_in_range - minus_one)
    ctx.cover("sort_align.skip.not_owned", skipped - (flat.numel() - n_in_range))


def _offsets(counts: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exclusive prefix sums [E_l + 1] of the counts and of the counts rounded up to bs."""
    runs = torch.stack([counts, (counts + bs - 1) // bs * bs])
    offsets = torch.zeros((2, counts.numel() + 1), dtype=torch.int32)
    torch.cumsum(runs, 1, dtype=torch.int32, out=offsets[:, 1:])
    return offsets[0], offsets[1]


def _single_block(local: torch.Tensor, totals: torch.Tensor, bs: int, K: int):
    """One block counts, scans and scatters: a stable counting sort by local expert.

    Returns (expert_counts, expert_offsets, aligned_offsets, kept expanded rows, their aligned
    positions, skipped expanded rows, duplicate slots)."""
    E_l = totals.numel() - 1
    skey, order = torch.sort(local, stable=True)  # skipped (bucket E_l) last
    counts = totals[:E_l]
    expert_offsets, aligned_offsets = _offsets(counts, bs)
    n = local.numel() - int(totals[E_l])
    x, e = order[:n], skey[:n]
    position = (aligned_offsets - expert_offsets)[:-1].index_select(0, e) + torch.arange(n)
    row = x // K  # a row's duplicates are neighbours in this order
    n_dup = int(((e[1:] == e[:-1]) & (row[1:] == row[:-1])).sum())
    return counts, expert_offsets, aligned_offsets, x, position, order[n:], n_dup


def _three_step(local: torch.Tensor, totals: torch.Tensor, bs: int, K: int,
                drop_duplicates: bool, ctx: StageContext):
    """blockExpertPrefixSum, global prefix, merge, over blocks of SORT_THREADS rows.

    Same returns as `_single_block`; with `drop_duplicates` the dropped duplicate slots are
    in neither the kept nor the skipped rows: nothing writes their entries.

    Without dropping, the result is `_single_block`'s: blocks hold increasing expanded rows,
    so (expert, block, row in block) is the order (expert, expanded row) of the single block's
    stable sort, and a row (inside one block) has the same neighbours in both orders. The
    stage runs this model only where it differs (`sort-duplicate-break` with duplicates);
    tests hold the two equal everywhere else."""
    NK, E_l = local.numel(), totals.numel() - 1
    per_block = geometry.SORT_THREADS * K
    blocks = -(-NK // per_block)
    n = NK - int(totals[E_l])
    # step 1: each block orders its pairs by (expert, row), i.e. per expert a block-local
    # exclusive scan of "pair has expert e". One stable sort keyed (block, expert) does every
    # block; skipped pairs share a key past every block, so the kept ones come first.
    block_base = torch.arange(blocks, dtype=torch.int32) * E_l
    key = local + block_base[:, None].expand(blocks, per_block).reshape(-1)[:NK]
    key.masked_fill_(local == E_l, blocks * E_l)
    skey, order = torch.sort(key, stable=True)
    skey, x, skipped = skey[:n], order[:n], order[n:]
    row = x // K  # a row's duplicates are neighbours in this order
    dup = torch.zeros(n, dtype=torch.bool)
    dup[1:] = (skey[1:] == skey[:-1]) & (row[1:] == row[:-1])
    n_dup = int(dup.sum())
    if drop_duplicates and n_dup:
        # the per-row search breaks at the first matching slot: a duplicate slot is neither
        # counted nor written (the fixed kernel counts a row's multiplicity)
        ctx.cover("sort_align.duplicates_dropped", n_dup)
        first = (~dup).nonzero().squeeze(1)
        skey, x = skey.index_select(0, first), x.index_select(0, first)
    group_counts = torch.bincount(skey, minlength=blocks * E_l)  # [block, expert]
    block_counts = group_counts.view(blocks, E_l)
    counts = block_counts.sum(0)
    expert_offsets, aligned_offsets = _offsets(counts, bs)
    # step 2: global prefix over (expert, block): where block b's run of expert e starts
    run_start = aligned_offsets[:-1] + (block_counts.cumsum(0) - block_counts)
    # step 3: merge: run start + block-local position (index in this order minus the pairs
    # of earlier (block, expert) groups)
    group_start = group_counts.cumsum(0) - group_counts
    position = ((run_start.reshape(-1) - group_start).index_select(0, skey)
                + torch.arange(skey.numel()))
    return counts, expert_offsets, aligned_offsets, x, position, skipped, n_dup


def sort_align_cpu(inp: SortAlignInput, ctx: StageContext, cases: int = 1) -> SortAlignOutput:
    """Counts, scans and scatters the (row, slot) pairs by local expert, block-aligned.

    `cases` > 1: the input stacks that many same-shape cases (`harness.chain.stacked`): case
    c's rows are the c-th N / cases and its experts the c-th E_l / cases (ids offset by c *
    E_l / cases). Launches are validated and the path chosen per case; the stable counting
    sort over the offset experts lays the cases out one after another, each exactly as its own
    run would (positions offset by the earlier cases' aligned totals). The duplicate-dropping
    three-step model is per case only (`ValueError` if a stack would need it)."""
    N, K = inp.topk_ids.shape
    E_l, bs = inp.num_local_experts, inp.block_size
    NK = N * K
    if E_l > 0:
        geometry.validate(geometry.sort_launches(N // cases, E_l // cases))
    else:  # a rank owning no experts launches nothing; every pair is skipped
        ctx.cover("sort_align.no_local_experts")
    local = _local_ids(inp)
    totals = torch.bincount(local, minlength=E_l + 1)  # per expert, then the skipped
    n_skipped = int(totals[E_l])
    if n_skipped:
        _cover_skips(inp, ctx, n_skipped)
    if geometry.sort_uses_three_step(N // cases):
        ctx.cover("sort_align.path.three_step", cases)
        ctx.cover("sort_align.blocks", cases * -(-(N // cases) // geometry.SORT_THREADS))
        # the three-step result is the single block's unless duplicates are dropped (see
        # _three_step): that one cheaper sort decides, and finds the duplicates
        result = _single_block(local, totals, bs, K)
        if result[-1] and ctx.bugs.on("sort-duplicate-break"):
            if cases > 1:
                raise ValueError("a stack of cases cannot model sort-duplicate-break's "
                                 "three-step blocks: run its cases one by one")
            result = _three_step(local, totals, bs, K, True, ctx)
    else:
        ctx.cover("sort_align.path.single_block", cases)
        result = _single_block(local, totals, bs, K)
    counts, expert_offsets, aligned_offsets, x, position, skipped, n_dup = result
    ctx.cover("sort_align.duplicates", n_dup)
    num_tokens_post_pad, n_empty = torch.stack(
        [aligned_offsets[-1], (counts == 0).sum()]).tolist()
    ctx.cover("sort_align.empty_experts", n_empty)
    ctx.cover("sort_align.padding_slots", num_tokens_post_pad - x.numel())

    # the scatters, both ways; their indices are the stage's own (in range by construction);
    # the buffers start as poison, so an entry nobody writes stays visible
    size = geometry.max_num_tokens_padded(N, K, E_l, bs)
    sorted_ids = CheckedBuffer(STAGE, "sorted_token_ids", size, torch.int32)
    sorted_ids.data.fill_(NK).index_copy_(0, position, x.to(torch.int32))
    permuted_row = CheckedBuffer(STAGE, "permuted_row", NK, torch.int32)
    permuted_row.data.index_fill_(0, skipped, -1).index_copy_(0, x, position.to(torch.int32))

    # expert of each block of the aligned layout: the last expert whose run starts at or
    # before it (an empty run starts where the next begins, so it never owns a block)
    m_blocks = geometry.max_num_m_blocks(N, K, E_l, bs)
    used = num_tokens_post_pad // bs
    expert_ids = torch.full((m_blocks,), -1, dtype=torch.int32)
    expert_ids[:used] = torch.searchsorted(
        aligned_offsets, torch.arange(0, used * bs, bs, dtype=torch.int32), right=True) - 1
    return SortAlignOutput(counts.to(torch.int32), expert_offsets, aligned_offsets,
                           permuted_row.data, sorted_ids.data, expert_ids, num_tokens_post_pad)
