"""The oracle: an independent, plain-torch statement of what every stage of the chain computes.

No lanes, blocks or kernels here: softmax / sigmoid, a total order for top-k, a stable sort,
`index_add`. Every function is stage-local (it takes the input a stage actually received), so
`harness.invariants` can hold each stage to it even when an upstream fault corrupted that input.

Policy (the fixed chain's documented behaviour, stated once):

* Scores are computed in fp32 from the input dtype (an exact conversion): softmax over the
  row, or sigmoid. A score that is NaN or +-Inf is clamped to 0 (vLLM PR 39391). A row with
  any NaN or +Inf logit therefore scores all zeros under softmax (its sum is not finite).
* Selection is by value = score + correction_bias (bias only for selection), descending; ties
  go to the lowest expert index. A NaN selection value (a NaN bias) ranks below every other
  value, -Inf included; +0.0 and -0.0 are equal.
  The kernels mask a chosen expert with -10000 (warp path) or skip values that do not beat
  -Inf (fallback), so the selection is defined for biases > -10000 only; with a lower, -Inf or
  NaN bias a chosen expert may be selected again (harness.invariants then does not judge the
  selection).
* Weights are the unbiased scores of the selected experts; renormalised, w / (sum > 0 ? sum
  : 1) with the sum in fp32. A sum below the smallest normal fp32 (sigmoid scores that
  underflow) is implementation-defined (flush-to-zero): such rows are not judged.
* Ids: routing skips ids of -1, ids outside [0, E) and ids not owned by the rank (expert_map
  -1 or outside [0, E_l)). Expert parallelism never changes the math: the chain's output is
  out[t] = sum_k w[t, k] * hidden[t] @ W[id[t, k]] over ids in [0, E).
* Layouts: the (row, slot) pairs are ordered by local expert, then by expanded row x = n*K + k
  (stable); each expert's run is padded to a multiple of block_size, padding holds the
  sentinel N*K; expert_ids holds the owning expert of each block, -1 past num_tokens_post_pad.

Tolerances (`tolerance`): (rtol, atol) against a *scale*, not the value: |actual - expected|
<= atol + rtol * scale, where scale bounds the magnitude of the terms summed (sum |a_i b_i|),
so cancellation never makes the test flaky. fp32 1e-4, fp16 1e-2, bf16 3e-2: the slack an
implementation computing in the input precision (tensor-core MMA, half accumulators in a
reduction) needs on the harness's small hidden sizes. Gating uses the fp32 tolerance whatever
the input dtype: its scores are fp32 by contract. A scale that is not finite or within 1/16 of
the fp32 range is not judged (`judged`): a term was not finite, or the sum may overflow in
one order of summation and not in another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness import geometry
from harness.case import Materialized, MoECase
from harness.chain.gating import GatingInput, GatingOutput
from harness.chain.lora_align import LoraAlignInput
from harness.chain.sort_align import SortAlignInput, SortAlignOutput

_TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2),
               torch.bfloat16: (3e-2, 3e-2)}
_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: rows per chunk of the gating oracle (bounds memory on 1M-token cases)
GATING_CHUNK_ELEMS = 1 << 24
#: gathered weight elements (pairs * H * H) above which expert products are grouped by expert
GATHER_LIMIT = 1 << 22
#: scales at or above this are not judged (an overflow-close sum depends on its order)
FP32_HEADROOM = torch.finfo(torch.float32).max / 16
#: elements of a batched product below which it is a broadcast multiply-and-sum
SMALL_BMM = 1 << 15
#: hidden sizes up to which experts_finalize mixes the weight matrices per token first
SMALL_H = 16
#: floats of mixed weight matrices per chunk of tokens in experts_finalize
COMBINE_CHUNK_ELEMS = 1 << 22


def tolerance(dtype: torch.dtype | str) -> tuple[float, float]:
    """(rtol, atol) for outputs computed from inputs of `dtype` (see the module docstring)."""
    dt = _NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    return _TOLERANCES.get(dt, _TOLERANCES[torch.float32])


def judged(scale: torch.Tensor) -> torch.Tensor:
    """Where a result whose terms' magnitudes sum to `scale` is held to the oracle: the scale
    is finite and below 1/16 of the fp32 range. Beyond, a term was not finite or the sum may
    overflow, and the order of summation decides the result (inf, NaN or a finite value)."""
    return scale.float() < FP32_HEADROOM  # False for NaN


def mismatches(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor,
               dtype: torch.dtype | str) -> torch.Tensor:
    """Elementwise (broadcast): is `actual` wrong? Where `judged(scale)`, `actual` must lie
    within atol + rtol * scale of `expected` (a NaN or infinite `actual` never does)."""
    rtol, atol = tolerance(dtype)
    limit = scale.float() * rtol + atol
    return judged(scale) & ~((actual.float() - expected.float()).abs() <= limit)


def row_mismatches(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor,
                   dtype: torch.dtype | str) -> torch.Tensor:
    """[R] bool: is row r of `actual` [R, H] wrong anywhere? `scale` [R] (or [R, 1]) bounds
    the row's terms; rows are judged as in `mismatches` (one pass less than elementwise)."""
    rtol, atol = tolerance(dtype)
    scale = scale.reshape(-1).float()
    err = (actual.float() - expected.float()).abs_().amax(1)  # NaN propagates
    return judged(scale) & ~(err <= scale * rtol + atol)


# -- gating ----------------------------------------------------------------------------------


def scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """[T, E] fp32 scores, NaN / +-Inf clamped to 0."""
    x = logits.float()
    if scoring == "softmax":
        # softmax written out (torch.softmax's parallel kernel costs milliseconds on tiny rows
        # on a busy CPU); same NaN behaviour: a NaN or +Inf logit, or an all -Inf row, makes
        # the whole row NaN
        e = (x - x.amax(1, keepdim=True)).exp()
        s = e / e.sum(1, keepdim=True)
    else:
        s = torch.sigmoid(x)
    return torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)


def selection_values(s: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """score + bias (fp32), the values top-k selects by."""
    return s if bias is None else s + bias.float()


def _order_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys, one per element, in the selection's total order: larger value first, then
    lower expert index; NaN below everything, -0.0 == +0.0. Distinct within a row."""
    E = values.shape[-1]
    v = values.float() + 0.0  # -0.0 + 0.0 = +0.0
    bits = v.view(torch.int32)
    key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()  # monotone in the value
    key = torch.where(torch.isnan(v), torch.iinfo(torch.int32).min - 1, key)
    return key * 2048 + (2047 - torch.arange(E))  # E <= 1024


def gating(inp: GatingInput) -> GatingOutput:
    """What top-k gating must return for `inp` (ids int32 in selection order, weights fp32)."""
    logits = inp.gating_logits
    T, E = logits.shape
    K = inp.topk
    ids = torch.empty((T, K), dtype=torch.int32)
    weights = torch.empty((T, K), dtype=torch.float32)
    step = max(1, GATING_CHUNK_ELEMS // max(E, 1))
    for r0 in range(0, T, step):
        s = scores(logits[r0:r0 + step], inp.scoring)
        sel = selection_values(s, inp.correction_bias)
        top = _order_keys(sel).topk(K, dim=1).indices
        w = s.gather(1, top)
        if inp.renormalize:
            total = w.sum(1, keepdim=True)
            w = w / torch.where(total > 0, total, torch.ones_like(total))
        ids[r0:r0 + step] = top.to(torch.int32)
        weights[r0:r0 + step] = w
    return GatingOutput(ids, weights)


# -- routing, sort / align -------------------------------------------------------------------


def route_local(topk_ids: torch.Tensor, expert_map: torch.Tensor, num_local: int) -> torch.Tensor:
    """[N, K] int64 local expert ids, -1 for skipped slots (id -1, outside [0, E), not owned)."""
    ids = topk_ids.long()
    E = expert_map.numel()
    in_range = (ids >= 0) & (ids < E)
    if E == 0:
        return torch.full_like(ids, -1)
    safe = torch.where(in_range, ids, 0)
    local = expert_map.long().index_select(0, safe.reshape(-1)).view(safe.shape)
    return torch.where(in_range & (local >= 0) & (local < num_local), local, -1)


def _exclusive(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.new_zeros(1), x.cumsum(0)])


def sort_align(inp: SortAlignInput) -> SortAlignOutput:
    """The block-aligned layout of one rank's pairs (all outputs int32, sized as the stage's
    static buffers: max_num_tokens_padded / max_num_m_blocks over the local experts)."""
    N, K = inp.topk_ids.shape
    E_l, bs = inp.num_local_experts, inp.block_size
    NK = N * K
    local = route_local(inp.topk_ids, inp.expert_map, E_l).reshape(-1)
    valid = local >= 0
    if bool(valid.all()):
        x, e = torch.arange(NK), local
    else:
        x = torch.nonzero(valid).squeeze(1)  # ascending expanded rows
        e = local[x]
    e_sorted, order = torch.sort(e.to(torch.int32), stable=True)
    x_sorted = order if x.numel() == NK else x.index_select(0, order)
    counts = torch.bincount(e, minlength=E_l)
    offsets = _exclusive(counts)
    padded = (counts + bs - 1) // bs * bs
    aligned = _exclusive(padded)
    post_pad = int(aligned[-1])
    # the i-th pair in sorted order sits at aligned[e] + (i - offsets[e])
    position = (aligned[:-1] - offsets[:-1]).index_select(0, e_sorted) + torch.arange(x.numel())

    sorted_ids = torch.full((geometry.max_num_tokens_padded(N, K, E_l, bs),), NK,
                            dtype=torch.int32)
    sorted_ids.index_copy_(0, position, x_sorted.to(torch.int32))
    permuted = torch.full((NK,), -1, dtype=torch.int32)
    permuted.index_copy_(0, x_sorted, position.to(torch.int32))
    expert_ids = torch.full((geometry.max_num_m_blocks(N, K, E_l, bs),), -1, dtype=torch.int32)
    starts = torch.arange(post_pad // bs) * bs  # each block's owner: the run it starts in
    expert_ids[:post_pad // bs] = torch.searchsorted(aligned[1:], starts, right=True).to(
        torch.int32)
    i32 = torch.int32
    return SortAlignOutput(counts.to(i32), offsets.to(i32), aligned.to(i32), permuted,
                           sorted_ids, expert_ids, post_pad)


# -- experts, finalize, the whole chain ------------------------------------------------------


def batched_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.bmm, as a broadcast multiply-and-sum on small problems (bmm's parallel kernel
    costs milliseconds on tiny batches when the CPU is busy)."""
    if a.numel() * b.shape[-1] <= SMALL_BMM:
        return (a.unsqueeze(-1) * b.unsqueeze(1)).sum(-2)
    return torch.bmm(a, b)


def expert_products(hidden: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor,
                    experts: torch.Tensor) -> torch.Tensor:
    """[P, H] fp32: hidden[rows[p]].float() @ weights[experts[p]], for in-range indices.

    Small problems: one batched product. Otherwise grouped by expert, one matmul per expert
    (bounded memory at any H)."""
    H = weights.shape[-1]
    P = rows.numel()
    if P * H * H <= GATHER_LIMIT:
        h = hidden.index_select(0, rows).float().unsqueeze(1)
        return batched_matmul(h, weights.index_select(0, experts).float()).squeeze(1)
    out = torch.empty((P, H), dtype=torch.float32)
    e_sorted, order = torch.sort(experts, stable=True)
    uniq, counts = torch.unique_consecutive(e_sorted, return_counts=True)
    h = hidden.index_select(0, rows.index_select(0, order)).float()
    res = torch.empty_like(h)
    start = 0
    for e, n in zip(uniq.tolist(), counts.tolist(), strict=True):
        torch.mm(h[start:start + n], weights[e].float(), out=res[start:start + n])
        start += n
    return out.index_copy_(0, order, res)


def experts_finalize(hidden: torch.Tensor, expert_weights_local: torch.Tensor,
                     local_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """[N, H] fp32: out[n] = sum_k w[n, k] * hidden[n].float() @ W[local_ids[n, k]], skipping
    ids outside [0, E_l) (-1 included).

    For small H computed as hidden[n] @ (sum_k w[n, k] W[id]) (the same sum, reassociated:
    sequential memory, no gather of hidden rows); for large H pair by pair, grouped by expert.
    """
    N, K = local_ids.shape
    E_l, H = expert_weights_local.shape[0], expert_weights_local.shape[-1]
    ids = local_ids.long()
    ok = (ids >= 0) & (ids < E_l)
    out = torch.zeros((N, H), dtype=torch.float32)
    if E_l == 0 or N == 0:
        return out
    if H > SMALL_H:
        flat = ok.reshape(-1)
        pairs = torch.nonzero(flat).squeeze(1)
        rows = pairs // K
        prod = expert_products(hidden, expert_weights_local, rows, ids.reshape(-1)[pairs])
        w = topk_weights.float().reshape(-1)[pairs]
        return out.index_add_(0, rows, prod * w[:, None])
    table = expert_weights_local.float().reshape(E_l, H * H)
    w = torch.where(ok, topk_weights.float(), 0.0)  # a skipped slot adds 0 * W[0] = 0
    safe = torch.where(ok, ids, 0)
    step = max(1, COMBINE_CHUNK_ELEMS // (H * H))
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        mix = torch.zeros((r1 - r0, H * H), dtype=torch.float32)
        for k in range(K):
            mix.addcmul_(table.index_select(0, safe[r0:r1, k]), w[r0:r1, k, None])
        h = hidden[r0:r1].float().unsqueeze(1)
        out[r0:r1] = batched_matmul(h, mix.view(r1 - r0, H, H)).squeeze(1)
    return out.masked_fill_(~ok.any(1, keepdim=True), 0.0)  # no term: 0, whatever hidden holds


def chain_output(case: MoECase, tensors: Materialized, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
    """[T, H] fp32: the end-to-end result for the routed ids and weights. Expert parallelism
    must not change it: every id in [0, E) contributes once per slot, on whichever rank."""
    E = case.num_experts
    ids = topk_ids.long()
    local = torch.where((ids >= 0) & (ids < E), ids, -1)
    return experts_finalize(tensors.hidden_states, tensors.expert_weights, local, topk_weights)


# -- LoRA align ------------------------------------------------------------------------------


@dataclass(eq=False)
class LoraExpectation:
    """What LoRA align must write, per adapter a in [0, max_loras).

    written [L] bool: the adapters whose rows must be written (a slot's lora_id in
    [0, max_loras), adapter_enabled[lora_id] != 0); every other row stays untouched (poison).
    For written adapters: num_tokens_post_pad [L] int64 (0 elsewhere); sorted_token_ids
    [L, max_num_tokens_padded(T, K, E, bs)] int32 and expert_ids [L, max_num_m_blocks] int32,
    meaningful on positions < num_tokens_post_pad[a] (blocks < num_tokens_post_pad[a] / bs).
    Within an expert's run the order is the stable one (ascending expanded row t*K + k); the
    sentinel T*K fills the padding. (harness.invariants accepts any order within a run: the
    real kernel scatters with atomics.)
    """

    written: torch.Tensor
    num_tokens_post_pad: torch.Tensor
    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor

    @property
    def untouched(self) -> torch.Tensor:
        return ~self.written


def lora_written(inp: LoraAlignInput) -> torch.Tensor:
    """[max_loras] bool: adapters named by a slot of lora_ids, in range and enabled."""
    L = inp.max_loras
    ids = inp.lora_ids.long().reshape(-1)
    ok = (ids >= 0) & (ids < L)
    present = torch.zeros(L + 1, dtype=torch.bool)
    present[torch.where(ok, ids, L)] = True
    enabled = inp.adapter_enabled.reshape(-1)[:L] != 0
    return present[:L] & enabled


def lora_align(inp: LoraAlignInput) -> LoraExpectation:
    """The expected per-adapter block-aligned layouts (see `LoraExpectation`)."""
    T, K = inp.topk_ids.shape
    E, bs, L = inp.num_experts, inp.block_size, inp.max_loras
    written = lora_written(inp)
    width = geometry.max_num_tokens_padded(T, K, E, bs)
    blocks = geometry.max_num_m_blocks(T, K, E, bs)
    lora = inp.token_lora_mapping.long().reshape(-1)
    mine = (lora >= 0) & (lora < L)
    mine &= written[torch.where(mine, lora, 0)]
    ids = inp.topk_ids.long()
    pair_ok = mine[:, None] & (ids >= 0) & (ids < E)
    x = torch.nonzero(pair_ok.reshape(-1)).squeeze(1)  # ascending expanded rows
    key = lora[x // K] * E + ids.reshape(-1)[x]  # (adapter, expert), adapter-major
    key_sorted, order = torch.sort(key, stable=True)
    counts = torch.bincount(key, minlength=L * E).view(L, E)
    padded = (counts + bs - 1) // bs * bs
    aligned = torch.cat([padded.new_zeros(L, 1), padded.cumsum(1)], dim=1)  # [L, E + 1]
    run_start = _exclusive(counts.reshape(-1))[:-1]
    a, e = key_sorted // E, key_sorted % E
    position = aligned[a, e] + torch.arange(x.numel()) - run_start[key_sorted]

    sorted_ids = torch.full((L, width), T * K, dtype=torch.int32)
    sorted_ids.view(-1)[a * width + position] = x[order].to(torch.int32)
    starts = torch.arange(blocks) * bs
    owner = torch.searchsorted(aligned[:, 1:].contiguous(), starts.expand(L, blocks).contiguous(),
                               right=True)
    expert_ids = torch.where(starts < aligned[:, E:], owner, -1).to(torch.int32)
    post_pad = torch.where(written, aligned[:, E], 0)
    return LoraExpectation(written, post_pad, sorted_ids, expert_ids)
