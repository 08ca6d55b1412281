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
entries whose permuted_row is -1. The fixed kernels are defensive: experts skips blocks whose
expert id is outside [0, E_l) and positions whose token is outside [0, N*K); finalize skips a
permuted_row outside [0, P). Every skip is counted in the coverage. `grid-y-overflow` lives
here; `sort-duplicate-break` restores the finalize that shipped with that sort and trusted its
permutation (only -1 skipped): the unset entries a duplicate leaves are dereferenced, the
illegal access of vLLM issue 39244.

Contract: the sort stage's outputs for the same ids (faults may corrupt them; a fixed kernel
still never reads out of bounds where its indices are in range).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness import geometry
from harness.chain import StageContext
from harness.errors import IllegalAccess
from harness.memory import CheckedBuffer

STAGE = "experts"
#: floats gathered per sub-chunk of blocks (hidden rows + per-block weights): bounds memory
SUB_CHUNK_FLOATS = 1 << 23
#: gathered floats per chunk of finalize rows
FINALIZE_CHUNK_FLOATS = 1 << 22


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
    """CPU model of the chunked grouped-linear kernel (one launch per chunk of m-blocks).

    The launches are validated before anything is allocated, so `grid-y-overflow` fails with
    `LaunchConfigError` on any problem size without touching memory.
    """
    N, K, bs = inp.hidden_states.shape[0], inp.topk, inp.block_size
    E_l, H = inp.expert_weights.shape[0], inp.expert_weights.shape[-1]
    chunked = not ctx.bugs.on("grid-y-overflow")
    geometry.validate(geometry.experts_launches(N, K, E_l, bs, H, chunked=chunked))
    chunks = geometry.experts_chunks(N, K, E_l, bs, chunked=chunked)
    return experts_over_chunks(inp, ctx, chunks)


def experts_over_chunks(inp: ExpertsInput, ctx: StageContext,
                        chunks: list[tuple[int, int]]) -> ExpertsOutput:
    """Run the experts kernel over the given [first, last) m-block ranges, one launch each.

    Split from `experts_cpu` so the chunk logic can be tested with small chunks.
    """
    K, bs, H = inp.topk, inp.block_size, inp.expert_weights.shape[-1]
    P = inp.sorted_token_ids.numel()
    sorted_ids, expert_ids = inp.sorted_token_ids.flatten(), inp.expert_ids.flatten()
    out = CheckedBuffer(STAGE, "expert_out", P * H, torch.float32)
    out_rows = out.view(P, H)
    hidden = inp.hidden_states.float()
    weights = inp.expert_weights.float()

    # a CTA exits when its first position is at or past num_tokens_post_pad
    active_blocks = max(-(-int(inp.num_tokens_post_pad) // bs), 0)
    # fixed guard: never run a block whose expert id or positions lie wholly outside the buffers
    in_buffers = min(expert_ids.numel(), -(-P // bs))
    if active_blocks > in_buffers:
        ctx.cover("experts.guard.post_pad_clamped")
        active_blocks = in_buffers
    ctx.cover("experts.launch.chunks", len(chunks))
    if len(chunks) > 1:
        ctx.cover("experts.launch.multi_chunk")
    sub = max(1, SUB_CHUNK_FLOATS // (bs * H + H * H))
    for first, last in chunks:
        end = min(last, active_blocks)
        ctx.cover("experts.block.early_exit", last - max(first, end))
        for b0 in range(first, end, sub):
            _run_blocks(b0, min(b0 + sub, end), bs, K, hidden, weights, sorted_ids,
                        expert_ids, out_rows, ctx)
    return ExpertsOutput(out_rows, len(chunks))


def _run_blocks(b0: int, b1: int, bs: int, K: int, hidden: torch.Tensor,
                weights: torch.Tensor, sorted_ids: torch.Tensor, expert_ids: torch.Tensor,
                out_rows: torch.Tensor, ctx: StageContext) -> None:
    """The CTAs of blocks [b0, b1), vectorised: a batched [bs, H] @ [H, H] per block."""
    nb, E_l, sentinel = b1 - b0, weights.shape[0], hidden.shape[0] * K
    p0, p1 = b0 * bs, min(b1 * bs, sorted_ids.numel())  # positions inside the buffers
    e = _read_range("expert_ids", expert_ids, b0, b1)
    e_ok = (e >= 0) & (e < E_l)
    x = _read_range("sorted_token_ids", sorted_ids, p0, p1)
    if p1 - p0 < nb * bs:  # a last block reaching past the buffer: its tail is not read
        ctx.cover("experts.guard.position_out_of_range", nb * bs - (p1 - p0))
        x = torch.cat([x, torch.full((nb * bs - (p1 - p0),), -1, dtype=x.dtype)])
    x = x.view(nb, bs)
    x_ok = (x >= 0) & (x < sentinel)
    write = x_ok & e_ok[:, None]
    n_ok, n_write, n_sentinel, n_e_ok = torch.stack([
        x_ok.count_nonzero(), write.count_nonzero(), (x == sentinel).count_nonzero(),
        e_ok.count_nonzero()]).tolist()
    ctx.cover("experts.guard.expert_out_of_range", nb - n_e_ok)
    ctx.cover("experts.position.sentinel", n_sentinel)
    ctx.cover("experts.guard.token_out_of_range", (p1 - p0) - n_ok - n_sentinel)
    ctx.cover("experts.position.computed", n_write)
    if n_write == 0:
        return
    rows = _gather_rows(STAGE, "hidden_states", hidden,
                        torch.where(write, x // K, 0).flatten()).view(nb, bs, -1)
    w = _gather_rows(STAGE, "expert_weights", weights, torch.where(e_ok, e, 0))
    res = torch.bmm(rows, w).view(nb * bs, -1)  # fp32 accumulate
    view = out_rows[p0:p1]  # unwritten positions keep their poison
    torch.where(write.view(-1, 1)[: p1 - p0], res[: p1 - p0], view, out=view)


def _read_range(name: str, buf: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """buf[start:stop], a contiguous read of an input, with `CheckedBuffer.read`'s check."""
    if start < 0 or stop > buf.numel():
        raise IllegalAccess(STAGE, name, start if start < 0 else buf.numel(), buf.numel(),
                            "out-of-bounds read")
    return buf[start:stop]


def _gather_rows(stage: str, name: str, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] (whole rows, 1-D index) with the bounds check a kernel's dereference would
    fail."""
    if index.numel() == 0:
        return table[index]
    lo, hi = torch.stack(torch.aminmax(index)).tolist()
    if lo < 0 or hi >= table.shape[0]:
        bad = (index < 0) | (index >= table.shape[0])
        raise IllegalAccess(stage, name, int(index[bad][0]), table.shape[0])
    return table.index_select(0, index)


@dataclass(eq=False)
class FinalizeInput:
    """expert_out [P, H] fp32; permuted_row [N*K] int32; topk_weights [N, K] fp32."""

    expert_out: torch.Tensor
    permuted_row: torch.Tensor
    topk_weights: torch.Tensor


def finalize_cpu(inp: FinalizeInput, ctx: StageContext) -> torch.Tensor:
    """[N, H] fp32: CPU model of the unpermute-and-reduce kernel (one CTA per row n).

    The K contributions are accumulated in order k = 0..K-1 in fp32, as the kernel does; a
    skipped entry contributes nothing (not weight * 0, which would turn a NaN weight into NaN).
    """
    N, K = inp.topk_weights.shape
    P, H = inp.expert_out.shape
    geometry.validate(geometry.finalize_launches(N))
    rows = inp.permuted_row.reshape(N, K)
    # the trusting finalize dereferences every row but -1 (`_gather_rows` checks the bounds)
    ok = (rows != -1) if ctx.bugs.on("sort-duplicate-break") else (rows >= 0) & (rows < P)
    n_unrouted, n_ok = torch.stack([(rows == -1).count_nonzero(), ok.count_nonzero()]).tolist()
    ctx.cover("finalize.skip.unrouted", n_unrouted)
    ctx.cover("finalize.guard.out_of_range", N * K - n_ok - n_unrouted)
    out = torch.zeros((N, H), dtype=torch.float32)
    if n_ok == 0:
        return out
    values = inp.expert_out.float()
    safe = torch.where(ok, rows, 0)
    weights = torch.where(ok, inp.topk_weights.float(), 0.0)  # a skipped NaN weight: no NaN
    step = max(1, FINALIZE_CHUNK_FLOATS // (K * H))
    for n0 in range(0, N, step):  # rows in chunks: one gather each, bounded memory
        n1 = min(n0 + step, N)
        got = _gather_rows("finalize", "expert_out", values, safe[n0:n1].flatten())
        got = torch.where(ok[n0:n1, :, None], got.view(n1 - n0, K, H), 0.0)
        acc = out[n0:n1]
        for term in (got * weights[n0:n1, :, None]).unbind(1):  # the kernel's order:
            acc.add_(term)  # k = 0..K-1, each product rounded to fp32, then added
    return out
