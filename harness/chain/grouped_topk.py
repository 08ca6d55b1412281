"""Stage 1, grouped top-k gating: the DeepSeek-V3 / Kimi-K2 router (`GatingInput.n_group >= 1`).

Models the grouped router of vLLM's `grouped_topk` (its fused kernel,
csrc/moe/grouped_topk_kernels.cu, from TensorRT-LLM's noaux_tc routing), one block per row:

1. scores in fp32 from the logits, softmax or sigmoid, NaN / +-Inf clamped to 0 (the policy of
   the plain router, vLLM PR 39391); selection values v = score + correction bias (bias only
   for selection, 0 without one);
2. group scores: the E experts form n_group groups of `size = E / n_group` consecutive experts;
   each group's score is the sum of its two largest v. The kernel finds them by an in-place
   partial selection sort of the group's slots in a scratch row `group_scratch` [T, E] (round
   j moves the largest of slots [base + j, base + size) to slot base + j, j = 0, 1), then adds
   slots base and base + 1;
3. the topk_group groups of largest score are kept (ties: lower group index);
4. K rounds over the kept groups' experts pick the largest v (ties: lower expert index), each
   winner masked with -inf for the next round; weight = the winner's unbiased score;
5. weights renormalised (w / (sum > 0 ? sum : 1), the sum in fp32 in selection order) if
   asked, then multiplied by routed_scaling_factor.

Groups of one expert (vLLM PR 29439): a group has no second-largest score. Fixed, the router
then routes the row by plain top-k over v (the fallback the PR added). With
`grouped-topk-tiny-groups` the partial sort runs its two rounds anyway: round 1 reads and
writes slot base + 1, the next group's, and past the end of the row in the last group, so the
last row's last group writes one past `group_scratch`: an out-of-bounds write.

Contract: as the plain router (any float logits; a correction bias > -10000), and
1 <= K <= topk_group * size.
"""

from __future__ import annotations

import torch

from harness import geometry
from harness.chain import StageContext
from harness.errors import ContractError
from harness.memory import CheckedBuffer

_NEG_INF = float("-inf")
#: rows per chunk (bounds the temporaries at large T)
_CHUNK_ELEMS = 1 << 21


def grouped_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """[n, E] fp32 scores, non-finite ones clamped to 0 (softmax: a row with a NaN or +Inf
    logit, or all -Inf, is all NaN before the clamp)."""
    x = logits.float()
    if scoring == "softmax":
        e = (x - x.amax(1, keepdim=True)).exp_()
        s = e.mul_(e.sum(1, keepdim=True).reciprocal_())
    else:
        s = x.neg().exp_().add_(1.0).reciprocal_()
    return s.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def first_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [.., k]: the indices of the k largest values along the last dim, in order, the
    lower index first among equals (what k rounds of a strict '>' scan find; -0.0 equals
    0.0). NaN-free input. A stable descending sort keeps equal values in index order."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


def grouped_topk_cpu(inp, ctx: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU model of the grouped router (see the module docstring) over a `GatingInput`:
    (topk_ids [T, K] int32, topk_weights [T, K] fp32)."""
    T, E = inp.gating_logits.shape
    K, G, TG = inp.topk, inp.n_group, inp.topk_group
    if inp.scoring not in ("softmax", "sigmoid"):
        raise ContractError("gating", f"unknown scoring {inp.scoring!r}")
    if not (1 <= G <= E and E % G == 0 and 1 <= TG <= G):
        raise ContractError("gating", f"n_group = {G}, topk_group = {TG} do not group "
                                      f"num_experts = {E}")
    size = E // G
    if not 1 <= K <= TG * size:
        raise ContractError("gating", f"topk = {K} outside 1..topk_group * group size = "
                                      f"{TG * size}")
    geometry.validate(geometry.grouped_gating_launches(T))
    ctx.cover("gating.path.grouped")
    ctx.cover(f"gating.scoring.{inp.scoring}")
    ctx.cover("gating.bias", inp.correction_bias is not None)
    ctx.cover("gating.renormalize", inp.renormalize)
    ctx.cover("gating.grouped.scaled", inp.routed_scaling_factor != 1.0)
    ctx.cover("gating.grouped.all_groups", TG == G)
    tiny = size < 2
    if tiny and ctx.bugs.on("grouped-topk-tiny-groups"):
        # the partial sort's second round: slot base + 1 of every group, written in place
        scratch = CheckedBuffer("gating", "group_scratch", T * E, torch.float32)
        last = torch.tensor([(T - 1) * E + (G - 1) * size + 1])
        scratch.write(last, 0.0)  # the last row's last group: one past the buffer
    ids = CheckedBuffer("gating", "topk_ids", T * K, torch.int32).view(T, K)
    weights = CheckedBuffer("gating", "topk_weights", T * K, torch.float32).view(T, K)
    bias = None if inp.correction_bias is None else inp.correction_bias.float().view(1, E)
    step = max(1, _CHUNK_ELEMS // E)
    group_ties = 0
    for r0 in range(0, T, step):
        rows = slice(r0, min(r0 + step, T))
        s = grouped_scores(inp.gating_logits[rows], inp.scoring)
        v = s if bias is None else s + bias
        if tiny:
            ctx.cover("gating.grouped.tiny_group_rows", v.shape[0])
            chosen = first_topk(v, K)
        else:
            top2 = torch.topk(v.view(-1, G, size), 2, dim=-1).values
            gscore = top2[..., 0] + top2[..., 1]
            kept = first_topk(gscore, TG)
            if TG < G:
                cut = gscore.gather(1, kept[:, -1:])
                group_ties += int(((gscore == cut).sum(1) > 1).sum())
            mask = torch.ones((v.shape[0], G), dtype=torch.bool).scatter_(1, kept, False)
            masked = v.view(-1, G, size).masked_fill(mask[..., None], _NEG_INF).view(-1, E)
            chosen = first_topk(masked, K)
        w = s.gather(1, chosen)
        if inp.renormalize:
            total = torch.zeros(w.shape[0], dtype=torch.float32)
            for k in range(K):  # in selection order, as thread 0 accumulates
                total += w[:, k]
            positive = total > 0
            ctx.cover("gating.renorm.unit_denominator", int((~positive).sum()))
            w = w / torch.where(positive, total, 1.0).view(-1, 1)
        if inp.routed_scaling_factor != 1.0:
            w = w * torch.tensor(inp.routed_scaling_factor, dtype=torch.float32)
        ids[rows] = chosen.to(torch.int32)
        weights[rows] = w
    ctx.cover("gating.grouped.group_tie_rows", group_ties)
    return ids, weights
