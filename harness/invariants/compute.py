"""Checks of the arithmetic: experts, finalize, and the whole chain end to end."""

from __future__ import annotations

import math

import torch

from harness import oracle
from harness.chain.result import RankRun, RunResult
from harness.invariants.common import (
    Report,
    finite,
    first,
    shape_of,
)

#: gathered floats per chunk of rows in the finalize check (bounds memory at 400,000 tokens)
CHUNK_FLOATS = 1 << 22

# -- experts, finalize -------------------------------------------------------------------------


def experts(rr: RankRun, dtype: torch.dtype, rep: Report) -> None:
    """matches-oracle: every written position p < num_tokens_post_pad holds
    hidden[x // K] @ W[expert_ids[p // bs]], for the layout the stage was given."""
    inp, out = rr.experts_in, rr.experts_out
    hidden, W = inp.hidden_states, inp.expert_weights
    N, H = hidden.shape
    E_l, K, bs = W.shape[0], inp.topk, inp.block_size
    sid = inp.sorted_token_ids.reshape(-1).long()
    eid = inp.expert_ids.reshape(-1).long()
    P = sid.numel()
    got_all = shape_of("expert_out", out.expert_out, (P, H))
    # the positions held to the oracle: below num_tokens_post_pad, within the buffers, with
    # a token in [0, N*K) (not the sentinel) and a block expert in [0, E_l)
    n = max(0, min(int(inp.num_tokens_post_pad), P // bs * bs, eid.numel() * bs))
    if n == 0 or E_l == 0 or N == 0:
        return
    nb = -(-n // bs)
    x = sid[:nb * bs]
    e = eid[:nb]
    e_ok = (e >= 0) & (e < E_l)
    ok = (((x >= 0) & (x < N * K)).view(nb, bs) & e_ok[:, None]).view(-1)
    if n < nb * bs:
        ok[n:] = False
    if not bool(ok.any()):
        return
    rows = torch.where(ok, x // K, 0)
    h = hidden.index_select(0, rows).float()
    e_safe = torch.where(e_ok, e, 0)
    expected = torch.bmm(h.view(nb, bs, H), W.index_select(0, e_safe).float())
    expected = expected.view(nb * bs, H)
    # |hidden[n] @ W[e]| <= ||hidden[n]||_1 * max|W[e]|; positions not held: a NaN scale
    w_max = W.abs().amax((1, 2)).float()[e_safe]
    scale = (h.abs().sum(1).view(nb, bs) * w_max[:, None]).view(-1)
    scale = torch.where(ok, scale, float("nan"))
    bad = oracle.row_mismatches(got_all[:nb * bs], expected, scale, dtype)
    if bool(bad.any()):
        i = first(bad)
        rep.add("matches-oracle", "expert_out differs from hidden @ W[expert]",
                positions=i, tokens=x[i], experts=e[i // bs], expert_out=got_all[i],
                oracle=expected[i])


def finalize(rr: RankRun, dtype: torch.dtype, rep: Report) -> None:
    """finite, matches-oracle: out[n] = sum_k w[n, k] * expert_out[permuted_row[n*K + k]] over
    the entries in [0, P), for the expert_out, permutation and weights the stage was given."""
    inp, out = rr.finalize_in, rr.finalize_out
    w = inp.topk_weights.float()
    N, K = w.shape
    values = inp.expert_out.float()
    P, H = values.shape
    got = shape_of("finalize output", out, (N, H)).float()
    rows = shape_of("permuted_row", inp.permuted_row.reshape(-1), (N * K,)).long().view(N, K)
    ok = (rows >= 0) & (rows < P)  # -1 (skipped) and out-of-range entries contribute nothing
    # a skipped entry reads an appended zero row with weight 0: exactly nothing
    table = torch.cat([values, values.new_zeros(1, H)])
    safe = torch.where(ok, rows, P)
    wk = torch.where(ok, w, 0.0)
    expected = torch.empty((N, H))
    scale = torch.empty(N)
    step = max(1, CHUNK_FLOATS // max(K * H, 1))
    for r0 in range(0, N, step):  # all K terms of a chunk of rows at once, bounded memory
        r1 = min(N, r0 + step)
        v = table.index_select(0, safe[r0:r1].reshape(-1)).view(r1 - r0, K, H)
        wr = wk[r0:r1]
        torch.sum(v * wr[:, :, None], 1, out=expected[r0:r1])
        # NaN propagates: not judged
        torch.sum(v.abs_().amax(2) * wr.abs(), 1, out=scale[r0:r1])
    # a judged scale means every term read was finite and their sum cannot overflow
    _judge_rows(rep, got, expected, scale, dtype,
                "non-finite output from finite weights and expert outputs",
                "output differs from sum_k w * expert_out[permuted_row]", "permuted_row", rows)


def _judge_rows(rep: Report, got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor,
                dtype: torch.dtype, nonfinite_message: str, mismatch_message: str,
                context_name: str, context: torch.Tensor) -> None:
    """finite, matches-oracle over output rows whose `scale` is judged (NaN: not judged): a
    non-finite row is reported once as such, not also as a mismatch; a mismatch names the
    row's `context` (its permutation entries or routed ids) beside the oracle."""
    nonfinite = oracle.judged(scale) & ~finite(got).all(1)
    bad = oracle.row_mismatches(got, expected, scale, dtype) & ~nonfinite
    any_nonfinite, any_bad = torch.stack([nonfinite.any(), bad.any()]).tolist()
    if any_nonfinite:
        r = first(nonfinite)
        rep.add("finite", nonfinite_message, rows=r, output=got[r], oracle=expected[r])
    if any_bad:
        r = first(bad)
        rep.add("matches-oracle", mismatch_message, rows=r, **{context_name: context[r]},
                output=got[r], oracle=expected[r])


# -- chain -------------------------------------------------------------------------------------


def chain(res: RunResult, rep: Report) -> None:
    """finite, matches-oracle: the end-to-end output vs oracle.chain_output of the routed ids
    (legal cases only: the driver decides)."""
    case, t = res.case, res.tensors
    if res.gating_out is not None:
        ids, w = res.gating_out.topk_ids, res.gating_out.topk_weights
    else:  # entered at topk_ids (a legal override)
        ids = case.overrides.topk_ids
        w = case.overrides.topk_weights
        if w is None:
            w = torch.full(tuple(ids.shape), 1.0 / case.topk)
    T, H = case.num_tokens, case.hidden_size
    got = shape_of("chain output", res.output, (T, H)).float()
    expected = oracle.chain_output(case, t, ids, w)
    lids = ids.long()
    # |hidden @ W[id]| <= ||hidden||_1 * max|W[id]| bounds each product before its weight
    # (which may be 0): a product that may overflow leaves the token unjudged
    w_all = t.expert_weights.abs().amax((1, 2))
    lo, hi = torch.stack(torch.aminmax(lids)).tolist() if lids.numel() else (0, 0)
    if 0 <= lo and hi < case.num_experts:  # every id routed (a legal gating)
        w_max = w_all[lids]
        terms = w.float().abs() * w_max
    else:
        ok = (lids >= 0) & (lids < case.num_experts)
        w_max = w_all[lids.masked_fill(~ok, 0)].masked_fill_(~ok, 0)
        terms = torch.where(ok, w.float().abs() * w_max, 0.0)
    h_l1 = t.hidden_states.float().abs().sum(1)
    scale = h_l1 * terms.sum(1)
    scale.masked_fill_(~oracle.judged(h_l1 * w_max.amax(1)), math.nan)
    _judge_rows(rep, got, expected, scale, case.torch_dtype,
                "non-finite output for finite weights and hidden states",
                "end-to-end output differs from sum_k w * hidden @ W[id]", "ids", ids)
