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

from harness import geometry
from harness.chain import StageContext
from harness.errors import IllegalAccess
from harness.memory import CheckedBuffer

STAGE = "lora_align"


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


def lora_align_cpu(inp: LoraAlignInput, ctx: StageContext, cases: int = 1) -> LoraAlignOutput:
    """CPU model of the two LoRA align kernels, one block per processed slot.

    Each kernel is modelled over all of its processed slots at once (blocks of one launch run
    concurrently); the slot decisions are taken per slot, as each block takes its own.
    `cases` > 1: the input stacks that many same-shape cases sharing their LoRA slots
    (`harness.chain.stacked`: ids of case c offset by c * E / cases), each adapter's row
    laying the cases out one after another; the launches are validated per case.
    """
    T, K = inp.topk_ids.shape
    E, bs, L = inp.num_experts, inp.block_size, inp.max_loras
    unchecked = ctx.bugs.on("lora-id-unchecked")
    launches = geometry.validate(geometry.lora_launches(
        L, E // cases, off_by_one=ctx.bugs.on("lora-grid-off-by-one")))
    grid = launches[0].grid[0]
    width = geometry.max_num_tokens_padded(T, K, E, bs)
    blocks = geometry.max_num_m_blocks(T, K, E, bs)
    sorted_ids = CheckedBuffer(STAGE, "sorted_token_ids", L * width, torch.int32)
    expert_ids = CheckedBuffer(STAGE, "expert_ids", L * blocks, torch.int32)
    post_pad = CheckedBuffer(STAGE, "num_tokens_post_pad", L, torch.int32)
    cumsum = CheckedBuffer(STAGE, "cumsum", L * (E + 1), torch.int32)
    output = LoraAlignOutput(sorted_ids.view(L, width), expert_ids.view(L, blocks),
                             post_pad.data)

    # the per-block skip test (same in both kernels, except where a variant drops a check)
    slots = inp.lora_ids.tolist()
    ctx.cover("lora_align.grid.slots", grid)
    ctx.cover("lora_align.slot.beyond_grid", sum(lid != -1 for lid in slots[grid:]))
    candidates: list[int] = []
    for lid in slots[:grid]:
        if lid == -1:
            ctx.cover("lora_align.slot.base")
        elif not 0 <= lid < L and not unchecked:
            ctx.cover("lora_align.slot.out_of_range")
        else:
            ctx.cover("lora_align.slot.unchecked_id", not 0 <= lid < L)
            candidates.append(lid)
    if not candidates:
        return output
    flags = inp.adapter_enabled.tolist()
    _check_rows("adapter_enabled", len(flags), candidates, 1, "read")
    align_rows = [lid for lid in candidates if flags[lid] != 0]
    ctx.cover("lora_align.slot.disabled", len(candidates) - len(align_rows))
    sort_rows = align_rows
    if ctx.bugs.on("lora-disabled-adapter"):  # the sort kernel does not read adapter_enabled
        sort_rows = candidates
        ctx.cover("lora_align.sort.disabled_adapter", len(candidates) - len(align_rows))
    ctx.cover("lora_align.slot.duplicate", len(candidates) - len(set(candidates)))
    align_rows, sort_rows = list(dict.fromkeys(align_rows)), list(dict.fromkeys(sort_rows))
    ctx.cover("lora_align.slot.processed", len(align_rows))
    if not sort_rows:
        return output
    pairs = _group_pairs(inp, sort_rows, ctx)

    # kernel 1, align: per-expert counts -> aligned offsets, expert_ids, sentinel fill
    if align_rows:
        rows = torch.tensor(align_rows)
        aligned = (pairs.counts[rows] + bs - 1) // bs * bs
        offsets = torch.nn.functional.pad(aligned.cumsum(1), (1, 0))  # [R, E + 1]
        _write_rows(cumsum, align_rows, rows, E + 1, offsets)
        starts = torch.arange(0, blocks * bs, bs).expand(rows.numel(), blocks).contiguous()
        owner = torch.searchsorted(offsets[:, 1:].contiguous(), starts, right=True)
        _write_rows(expert_ids, align_rows, rows, blocks,
                    torch.where(starts < offsets[:, E:], owner, -1))
        _write_rows(post_pad, align_rows, rows, 1, offsets[:, E:])
        _write_rows(sorted_ids, align_rows, rows, width, T * K)

    # kernel 2, count-and-sort: scatter each pair to its expert's offset + its rank
    _check_rows(cumsum.name, cumsum.size, sort_rows, E + 1, "read")
    rows = torch.tensor(sort_rows)
    read = cumsum.data.view(-1, E + 1)[rows, :E].long()
    base = torch.zeros((L + 1, E), dtype=torch.long)  # row * width + offset, per (lora, e)
    base[rows] = read + rows[:, None] * width
    sorted_ids.write(base.flatten().index_select(0, pairs.keys) + pairs.rank, pairs.rows)
    ctx.cover("lora_align.pairs.sorted", pairs.rows.numel())
    return output


@dataclass(eq=False)
class _Pairs:
    """The valid (token, k) pairs of the adapters to process, grouped stably by
    key = lora_id * E + expert: rows (expanded row t*K + k), keys, rank within the key (the
    pair's position in its expert's run), counts [max_loras + 1, E]."""

    rows: torch.Tensor
    keys: torch.Tensor
    rank: torch.Tensor
    counts: torch.Tensor


def _group_pairs(inp: LoraAlignInput, wanted: list[int], ctx: StageContext) -> _Pairs:
    """Group once, for every processed adapter, what each block finds by scanning the tokens.

    `wanted` holds adapter ids in [0, max_loras] (an id outside it never gets this far).
    """
    K = inp.topk_ids.shape[1]
    E, L = inp.num_experts, inp.max_loras
    ids, lora = inp.topk_ids, inp.token_lora_mapping
    mine = torch.isin(lora, torch.tensor(wanted, dtype=lora.dtype))
    take = (ids >= 0) & (ids < E) & mine[:, None]
    n = int(torch.count_nonzero(take))
    ctx.cover("lora_align.pairs.invalid_expert", int(torch.count_nonzero(mine)) * K - n)
    past = (L + 1) * E  # a key past every valid one: pairs not taken sort last
    keys = torch.where(take, lora[:, None] * E + ids, past).flatten()
    counts = torch.bincount(keys, minlength=past + 1)[:past]
    keys, order = torch.sort(keys, stable=True)  # order = expanded rows, ascending per key
    keys = keys[:n]
    rank = torch.arange(n) - (counts.cumsum(0) - counts).index_select(0, keys)
    return _Pairs(order[:n], keys, rank, counts.view(L + 1, E))


def _check_rows(name: str, size: int, rows: list[int], width: int, access: str) -> None:
    """A block touching row r of a [-1, width] buffer of `size` elements: a row outside it is
    an out-of-bounds access at the row's first element (the block's first thread)."""
    for r in rows:
        if r < 0 or (r + 1) * width > size:
            raise IllegalAccess(STAGE, name, r * width, size, f"out-of-bounds {access}")


def _write_rows(buf: CheckedBuffer, rows: list[int], index: torch.Tensor, width: int,
                values: torch.Tensor | int) -> None:
    """Write whole rows (`rows`, as a list and as a tensor) of a [-1, width] checked buffer."""
    _check_rows(buf.name, buf.size, rows, width, "write")
    if isinstance(values, torch.Tensor):
        values = values.to(buf.data.dtype)
    buf.data.view(-1, width)[index] = values
