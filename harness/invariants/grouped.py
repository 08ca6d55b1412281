"""The gating checks' row judgement for grouped routing (DeepSeek-V3 / Kimi-K2 routers).

`routing.gating` runs the same checks for every router (ids-in-range, unique-ids,
weights-finite, renormalized, matches-oracle); what differs is how a row's selection and
weights are judged. For the grouped router (`GatingInput.n_group >= 1`) a row is right when:

* its weights are the chosen experts' clamped scores, renormalised if asked, times
  routed_scaling_factor (within the fp32 tolerance; renormalised rows sum to the factor);
* its selection equals the oracle's, or differs only by ties: the chosen selection values,
  sorted, equal the oracle's within tolerance, come in non-increasing order, and every chosen
  expert lies in a group whose score (the sum of its two largest selection values) is at
  least the oracle's topk_group-th group score, within tolerance.

Selection is judged on rows whose scores need no clamp, as for the plain router. Layers with
groups of one expert route by plain top-k (vLLM PR 29439): `routing` judges them as such.
"""

from __future__ import annotations

import torch

from harness import oracle
from harness.invariants.common import TINY, finite


def grouped_rows(inp, logits: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                 sel_defined: bool, rtol: float, atol: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(renormalisation wrong, selection or weights wrong) per row of one chunk of a grouped
    router's output (ids [n, K] in range, weights [n, K] fp32)."""
    K, G, TG = ids.shape[1], inp.n_group, inp.topk_group
    factor = float(inp.routed_scaling_factor)
    raw = logits.float()
    if inp.scoring == "softmax":
        clean = finite(torch.exp(raw - raw.amax(1, keepdim=True)).sum(1))
    else:
        clean = finite(torch.sigmoid(raw).sum(1))
    s = oracle.scores(logits, inp.scoring)
    chosen = s.gather(1, ids)
    expected = chosen
    bad_norm = torch.zeros(ids.shape[0], dtype=torch.bool)
    normal = None
    if inp.renormalize:
        total = chosen.sum(1, keepdim=True)
        expected = chosen / torch.where(total > 0, total, 1.0)
        normal = total.squeeze(1) >= TINY  # flush-to-zero sums are not judged
        bad_norm = normal & ((w.sum(1) - factor).abs() > atol * K * factor)
    expected = expected * factor
    bad = ~((w - expected).abs() <= expected * rtol + atol * factor).all(1)
    if normal is not None:
        bad &= normal
    if not sel_defined:
        return bad_norm, bad
    sel = oracle.selection_values(s, inp.correction_bias)
    want = oracle.grouped_selection(sel, K, G, TG)
    differs = (ids != want).any(1)
    if not bool(differs.any()):
        return bad_norm, bad
    got_v, want_v = sel.gather(1, ids), sel.gather(1, want)
    tol = got_v.abs() * rtol + atol
    same_values = ((got_v.sort(1, descending=True).values
                    - want_v.sort(1, descending=True).values).abs() <= tol).all(1)
    ordered = ~(got_v[:, 1:] > got_v[:, :-1] + tol[:, 1:]).any(1)
    gscore = oracle.group_scores(sel, G)
    kth = gscore.sort(1, descending=True).values[:, TG - 1:TG]
    in_kept = (gscore.gather(1, ids // (sel.shape[1] // G))
               >= kth - (kth.abs() * rtol + 2 * atol)).all(1)
    wrong = differs & ~(same_values & ordered & in_kept)
    return bad_norm, bad | (wrong & clean)
