"""Stage 1, top-k gating: scoring (softmax | sigmoid) then top-k selection.

Models the two paths of vLLM's `topk_softmax` kernels (csrc/moe/topk_softmax_kernels.cu):

* warp path (`topkGatingSoftmax`), for the expert counts in `geometry.WARP_EXPERTS`: a row is
  spread over `lanes = min(32, E)` lanes, lane l holding the `vpt = E / lanes` contiguous values
  [l*vpt, (l+1)*vpt). Scores are computed in fp32 (softmax: NaN-ignoring row max, exp(x - max),
  sum, multiply by 1/sum; sigmoid: 1 / (1 + exp(-x))). For each of the K rounds every lane
  starts its running max from its own first value and updates it on a strict `>` over its
  values (selection value = score + correction bias); a butterfly shuffle reduction over the
  lanes (xor masks lanes/2 .. 1) takes the other lane's pair when `other > mine` or when equal
  with a lower expert index; lane 0's winner is the round's (id, weight = the unbiased score);
  the lane owning the winner masks it with -10000 before the next round.
* fallback (`moeSoftmax`/`moeSigmoid` + `moeTopK`), for every other E: a scoring pass writes a
  float workspace [T, E]; then a block of 256 threads per row, each thread striding over the
  experts t, t+256, ..., holding a (key, value) pair initialised to (0, -inf) and replaced by an
  expert's when `value > best.value` or equal with a lower key, skipping experts already chosen
  in earlier rounds; a tree reduction over the 256 threads (stride 128 .. 1, same comparison).

Fixed (vLLM PR 39391): scores that are NaN or +-Inf are clamped to 0 right after scoring, on both
paths, so a NaN row yields the unique ids [0, 1, ..., K-1] by index tie-breaking. With
`topk-nan-argmax` the clamp is missing: NaN never wins a strict comparison and the row yields
duplicate ids ([0, 0, ...]).

Renormalisation (optional): weights / (sum > 0 ? sum : 1), summed in fp32.

Contract: any float logits, NaN/Inf included (legal: CUDA-graph padding rows); 1 <= K <= E.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.chain import StageContext
from harness.chain.geometry import uses_warp_path


@dataclass(eq=False)
class GatingInput:
    """gating_logits [T, E] (fp32 | fp16 | bf16); correction_bias [E] fp32 or None (added to
    the scores for selection only, as vLLM's fused_topk_bias)."""

    gating_logits: torch.Tensor
    correction_bias: torch.Tensor | None
    topk: int
    scoring: str = "softmax"
    renormalize: bool = False


@dataclass(eq=False)
class GatingOutput:
    """topk_ids [T, K] int32, in selection order; topk_weights [T, K] fp32."""

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


def gating_cpu(inp: GatingInput, ctx: StageContext) -> GatingOutput:
    """CPU model of the gating kernels (warp or fallback path by E)."""
    E = inp.gating_logits.shape[1]
    if uses_warp_path(E):
        ctx.cover("gating.path.warp")
        return _warp_path(inp, ctx)
    ctx.cover("gating.path.fallback")
    return _fallback_path(inp, ctx)


def _warp_path(inp: GatingInput, ctx: StageContext) -> GatingOutput:
    raise NotImplementedError


def _fallback_path(inp: GatingInput, ctx: StageContext) -> GatingOutput:
    raise NotImplementedError
