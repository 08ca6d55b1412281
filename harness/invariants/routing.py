"""Checks of the routing stages: top-k gating and the all-to-all dispatch + sanitize."""

from __future__ import annotations

import math

import torch

from harness import oracle
from harness.chain.result import RunResult
from harness.invariants.common import (
    MASK_VALUE,
    MAX_ENTRIES,
    TINY,
    Report,
    finite,
    first,
    shape_of,
)
from harness.memory import bits_view, framed

# -- gating ------------------------------------------------------------------------------------


def gating(res: RunResult, rep: Report) -> None:
    """ids-in-range, unique-ids, weights-finite, renormalized, matches-oracle (tie-aware)."""
    inp, out = res.gating_in, res.gating_out
    logits = inp.gating_logits
    T, E = logits.shape
    K = inp.topk
    ids = shape_of("topk_ids", out.topk_ids, (T, K)).long()
    w = shape_of("topk_weights", out.topk_weights, (T, K)).float()

    # one pass over each output first: on a clean run every range check below is skipped
    (id_lo, id_hi), (w_lo, w_hi) = (torch.stack(torch.aminmax(t)).tolist() for t in (ids, w))
    rows_ok = safe = None  # None: every id in range
    if not (id_lo >= 0 and id_hi < E):
        in_range = (ids >= 0) & (ids < E)
        rows_ok = in_range.all(1)
        safe = ids.masked_fill(~in_range, 0)
        if not bool(rows_ok.all()):
            r = first(~rows_ok)
            want = _oracle_rows(inp, r)
            rep.add("ids-in-range", f"expert ids outside [0, {E})", rows=r, ids=ids[r],
                    oracle_ids=want.topk_ids)
    # the selection is defined for biases > the kernels' mask value (-10000) only: below it
    # (or NaN) a chosen expert is selected again, by the kernels' design (see the oracle), and
    # the case is out of contract (MoECase.contract_violations)
    bias = inp.correction_bias
    sel_defined = bias is None or bool((bias.float() > MASK_VALUE).all())
    if sel_defined and K > 1:
        dup = _repeats(ids)
        if dup is not None:
            r = first(dup)
            want = _oracle_rows(inp, r)
            rep.add("unique-ids", "an expert id repeats within a token", rows=r, ids=ids[r],
                    oracle_ids=want.topk_ids, weights=w[r], oracle_weights=want.topk_weights)
    if not (w_lo >= 0 and w_hi < math.inf):  # a NaN fails both (aminmax propagates it)
        bad_w = ~((w >= 0) & (w < math.inf))
        if bool(bad_w.any()):
            r = first(bad_w)
            want = _oracle_rows(inp, r)
            rep.add("weights-finite", "a weight is NaN, infinite or negative", rows=r,
                    weights=w[r], oracle_weights=want.topk_weights, ids=ids[r],
                    oracle_ids=want.topk_ids)

    rtol, atol = oracle.tolerance("fp32")  # scores are fp32 by contract, whatever the input
    safe = ids if safe is None else safe
    step = max(1, oracle.GATING_CHUNK_ELEMS // max(E, 1))
    if T <= step:
        bad_norm, bad_match = _gating_rows(inp, logits, safe, w, sel_defined, rtol, atol)
    else:
        bad_norm = torch.zeros(T, dtype=torch.bool)
        bad_match = torch.zeros(T, dtype=torch.bool)
        for r0 in range(0, T, step):
            sl = slice(r0, r0 + step)
            bad_norm[sl], bad_match[sl] = _gating_rows(inp, logits[sl], safe[sl], w[sl],
                                                       sel_defined, rtol, atol)
    if rows_ok is not None:
        bad_norm &= rows_ok
        bad_match &= rows_ok
    any_norm, any_match = torch.stack([bad_norm.any(), bad_match.any()]).tolist()
    if any_norm:
        r = first(bad_norm)
        rep.add("renormalized", "renormalised weights do not sum to 1", rows=r,
                sums=w[r].sum(1))
    if any_match and not rep.found:
        r = first(bad_match)
        want = _oracle_rows(inp, r)
        rep.add("matches-oracle", "ids or weights differ from the oracle's top-k", rows=r,
                ids=ids[r], oracle_ids=want.topk_ids, weights=w[r],
                oracle_weights=want.topk_weights)


def _oracle_rows(inp, rows: torch.Tensor):
    """The oracle's top-k of the offending `rows` only (a failure path: the rows a finding
    shows beside the stage's own, never the whole batch)."""
    return oracle.gating(type(inp)(inp.gating_logits[rows], inp.correction_bias, inp.topk,
                                   inp.scoring, inp.renormalize))


def _repeats(ids: torch.Tensor) -> torch.Tensor | None:
    """[T] bool: does an id repeat within row t? None when none does. (All pairs when small,
    else a sort.)"""
    T, K = ids.shape
    if T * K * K <= 1 << 16:
        same = ids.unsqueeze(2) == ids.unsqueeze(1)
        if int(same.sum()) == T * K:  # the diagonals only
            return None
        return same.sum((1, 2)) > K  # the diagonal counts K
    s = ids.sort(1).values
    dup = (s[:, 1:] == s[:, :-1]).any(1)
    return dup if bool(dup.any()) else None


def _gating_rows(inp, logits: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
                 sel_defined: bool, rtol: float, atol: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(renormalisation wrong, selection or weights wrong) per row of one chunk.

    The weights must be the chosen experts' clamped scores (renormalised), on every row. The
    selection is checked without a top-k: the chosen values must be non-increasing and the
    last one at least every value not chosen (within tolerance), which is exactly "equal to
    the oracle's top-k values, ties in any order". It is checked on rows whose scores need no
    clamp (no NaN logit; under softmax no +Inf and not all -Inf): on the others the clamp
    makes every score 0 and unique-ids / weights-finite hold the policy.
    """
    K = ids.shape[1]
    unit = None  # softmax: scores = x / unit, normalised only where a bias needs it
    if inp.scoring == "softmax":
        x = torch.sub(logits, logits.amax(1, keepdim=True).float()).exp_()  # fp32, a new tensor
        unit = x.sum(1, keepdim=True)
        clean = finite(unit).squeeze(1)
        chosen = x.gather(1, ids) / unit
    else:
        x = torch.sigmoid(logits.float())
        clean = finite(x.sum(1))
        chosen = x.gather(1, ids)
    chosen = torch.nan_to_num(chosen, nan=0.0, posinf=0.0, neginf=0.0)  # the clamp policy
    bad_norm = torch.zeros(x.shape[0], dtype=torch.bool)
    expected_w = chosen
    if inp.renormalize:
        total = chosen.sum(1, keepdim=True)
        expected_w = chosen / torch.where(total > 0, total, 1.0)
        # a sum below the smallest normal float is implementation-defined (flush-to-zero, a
        # sigmoid that underflows to 0 or to a subnormal): such rows are not judged
        normal = total.squeeze(1) >= TINY
        bad_norm = normal & ((w.sum(1) - 1).abs() > atol * K)
    # |w - e| <= atol + rtol |e|, e >= 0 (clamped scores over a positive sum)
    bad = ~((w - expected_w).abs_() <= expected_w * rtol + atol).all(1)
    if inp.renormalize:
        bad &= normal
    if not sel_defined:
        return bad_norm, bad
    bias = inp.correction_bias
    if bias is not None:
        if unit is not None:
            x.div_(unit)
            unit = None
        x.add_(bias.float())
    got = x.gather(1, ids)
    tol = got.abs() * rtol + (atol if unit is None else unit * atol)
    order_bad = (got[:, 1:] > got[:, :-1] + tol[:, 1:]).any(1)  # selection order: descending
    if x.shape[1] > K:
        x.scatter_(1, ids, float("-inf"))
        order_bad |= got[:, -1] + tol[:, -1] < x.amax(1)  # nothing better was left out
    return bad_norm, bad | (order_bad & clean)


# -- dispatch ----------------------------------------------------------------------------------


def dispatch(res: RunResult, rep: Report) -> None:
    """padding-sanitized, counters-match (unless overridden), slots-match: against the
    routing the stage was given (after gating faults)."""
    inp, out = res.dispatch_in, res.dispatch_out
    ep, M = inp.ep_size, inp.max_tokens_per_rank
    T, K = inp.topk_ids.shape
    H = inp.hidden_states.shape[1]
    recv_ids = shape_of("recv_topk_ids", out.recv_topk_ids, (ep, ep, M, K))
    recv_w = shape_of("recv_topk_weights", out.recv_topk_weights, (ep, ep, M, K))
    recv_h = shape_of("recv_hidden", out.recv_hidden, (ep, ep, M, H))
    recv_tok = shape_of("recv_token_index", out.recv_token_index, (ep, ep, M))
    counters = shape_of("recv_counters", out.recv_counters, (ep, ep)).long()
    limit = counters.clamp(0, M)

    padding = torch.arange(M) >= limit[..., None]  # [dst, src, slot]
    unsanitized = padding & (recv_ids != -1).any(-1)
    if bool(unsanitized.any()):
        where = torch.nonzero(unsanitized)[:MAX_ENTRIES]
        d, s, m = where.unbind(1)
        rep.add("padding-sanitized", "padding slots beyond recv_counters hold expert ids != -1",
                slots=where, ids=recv_ids[d, s, m], recv_counters=counters[d, s])

    # what each destination must receive: source s sends, in token order, every token of
    # [s*P, (s+1)*P) with an id in [0, E) owned by the destination (rank ep: nobody; ids are
    # clamped onto two "nobody" entries framing the owner table)
    E = inp.rank_of_expert.numel()
    P = -(-T // ep)
    ids = inp.topk_ids
    rank = inp.rank_of_expert.long().clamp(-1, ep).remainder(ep + 1)  # outside [0, ep): ep
    owner = framed(rank, ep)[ids.long().clamp(-1, E) + 1]  # [T, K]
    sent = torch.zeros((ep * P, ep + 1), dtype=torch.bool)
    sent[:T].scatter_(1, owner, True)
    sent = sent[:, :ep].reshape(ep, P, ep)  # [src, token in src, dst]
    slot = sent.cumsum(1)
    true_counts = slot[:, -1].t()  # [dst, src]
    if inp.recv_counters_override is None:  # an override reports counts of its own by design
        wrong = counters != true_counts
        if bool(wrong.any()):
            where = torch.nonzero(wrong)[:MAX_ENTRIES]
            d, s = where.unbind(1)
            rep.add("counters-match", "recv_counters differ from the tokens actually routed",
                    pairs=where, recv_counters=counters[d, s], expected=true_counts[d, s])

    # real slots (below both the true count and the clamped counter) hold the routed tokens,
    # copied bit for bit
    flat = torch.nonzero(sent.reshape(-1)).squeeze(1)  # (src, token in src, dst): token order
    token, dst = flat // ep, flat % ep
    src = token // P
    m = slot.reshape(-1).index_select(0, flat) - 1
    if not bool((true_counts <= limit).all()):  # else every sent token has a real slot
        real = torch.nonzero(m < torch.minimum(true_counts, limit)[dst, src]).squeeze(1)
        src, dst, token, m = (t.index_select(0, real) for t in (src, dst, token, m))
    where = (dst * ep + src) * M + m  # flat [dst, src, slot]
    got_tok = recv_tok.reshape(-1).index_select(0, where)
    got_ids = recv_ids.reshape(-1, K).index_select(0, where)
    want_ids = ids.index_select(0, token)
    pairs = [(recv_w.reshape(-1, K).index_select(0, where),
              inp.topk_weights.to(recv_w.dtype).index_select(0, token)),
             (recv_h.reshape(-1, H).index_select(0, where),
              inp.hidden_states.to(recv_h.dtype).index_select(0, token))]
    if (torch.equal(got_tok, token.to(got_tok.dtype)) and torch.equal(got_ids, want_ids)
            and all(torch.equal(bits_view(a), bits_view(b)) for a, b in pairs)):
        return
    bad = (got_tok != token) | (got_ids != want_ids).any(1)
    for got, want in pairs:
        bad |= (bits_view(got) != bits_view(want)).any(1)
    if bool(bad.any()):
        i = torch.nonzero(bad)[:MAX_ENTRIES].squeeze(1)
        rep.add("slots-match", "a received slot does not hold its routed token",
                slots=torch.stack([dst[i], src[i], m[i]], 1), token_index=got_tok[i],
                expected_token=token[i], ids=got_ids[i], expected_ids=ids[token[i]])
