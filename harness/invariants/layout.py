"""Checks of the block-aligned layouts: sort/align (per rank) and LoRA align."""

from __future__ import annotations

import torch

from harness import oracle
from harness.chain.result import RankRun, RunResult
from harness.invariants.common import (
    Report,
    first,
    len_at_least,
    shape_of,
)
from harness.memory import is_poison


def _exclusive(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.new_zeros(1), x.cumsum(0)])


# -- sort_align --------------------------------------------------------------------------------


def sort_align(rr: RankRun, rep: Report) -> None:
    """no-poison, prefix-sums, permutation-bijection, alignment, then matches-oracle: against
    oracle.sort_align of the ids this rank received. Equal to the oracle: all hold."""
    inp, out = rr.sort_in, rr.sort_out
    N, K = inp.topk_ids.shape
    E_l, bs, NK = inp.num_local_experts, inp.block_size, N * K
    want = oracle.sort_align(inp)
    if _same_layout(out, want):
        return  # the oracle's layout satisfies every check below by construction
    counts = shape_of("expert_counts", out.expert_counts, (E_l,)).long()
    offsets = shape_of("expert_offsets", out.expert_offsets, (E_l + 1,)).long()
    aligned = shape_of("aligned_offsets", out.aligned_offsets, (E_l + 1,)).long()
    perm_raw = shape_of("permuted_row", out.permuted_row, (NK,))
    sorted_raw = len_at_least("sorted_token_ids", out.sorted_token_ids, want.num_tokens_post_pad)
    blocks = want.num_tokens_post_pad // bs
    eid_raw = len_at_least("expert_ids", out.expert_ids, blocks)
    post_pad = int(out.num_tokens_post_pad)
    S = sorted_raw.numel()

    # no-poison: everything the stage must write, by the oracle's extent
    poisoned = {name: int(is_poison(t).sum()) for name, t in (
        ("expert_counts", out.expert_counts), ("expert_offsets", out.expert_offsets),
        ("aligned_offsets", out.aligned_offsets), ("permuted_row", perm_raw),
        ("sorted_token_ids", sorted_raw[:want.num_tokens_post_pad]),
        ("expert_ids", eid_raw[:blocks]))}
    if any(poisoned.values()):
        where = first(is_poison(perm_raw))
        rep.add("no-poison", "outputs hold never-written (poison) entries",
                poisoned_entries={k: v for k, v in poisoned.items() if v},
                permuted_row_poison_at=where)

    # prefix-sums: internal consistency of counts, offsets, aligned offsets and the total
    padded = (counts + bs - 1) // bs * bs
    consistent = (bool((counts >= 0).all()) and bool((offsets == _exclusive(counts)).all())
                  and bool((aligned == _exclusive(padded)).all())
                  and post_pad == int(aligned[-1]) and 0 <= post_pad <= S)
    if not consistent:
        rep.add("prefix-sums", "counts, offsets, aligned offsets and num_tokens_post_pad "
                "are not consistent prefix sums", expert_counts=counts[:16],
                expert_offsets=offsets[:17], aligned_offsets=aligned[:17],
                num_tokens_post_pad=post_pad)

    # permutation-bijection: valid pairs <-> non-sentinel positions below num_tokens_post_pad
    local = oracle.route_local(inp.topk_ids, inp.expert_map, E_l).reshape(-1)
    valid = local >= 0
    perm = perm_raw.long()
    n_pos = max(0, min(post_pad, S))
    sid = sorted_raw[:n_pos].long()
    p_ok = (perm >= 0) & (perm < n_pos)
    back = torch.full_like(perm, -2)
    back[p_ok] = sid[perm[p_ok]]
    bad_x = torch.where(valid, ~p_ok | (back != torch.arange(NK)), perm != -1)
    real = sid != NK
    s_ok = (sid >= 0) & (sid < NK)
    forth = torch.full_like(sid, -2)
    forth[s_ok] = perm[sid[s_ok]]
    s_valid = torch.zeros_like(s_ok)
    s_valid[s_ok] = valid[sid[s_ok]]
    bad_p = real & (~s_valid | (forth != torch.arange(n_pos)))
    if bool(bad_x.any()) or bool(bad_p.any()):
        x = first(bad_x)
        p = first(bad_p)
        rep.add("permutation-bijection", "permuted_row and sorted_token_ids are not inverse "
                "over the valid pairs", rows=x, permuted_row=perm[x],
                oracle_permuted_row=want.permuted_row[x], local_ids=local[x],
                positions=p, sorted_token_ids=sid[p],
                oracle_sorted_token_ids=_at(want.sorted_token_ids, p))

    # alignment: by the stage's own (consistent) offsets
    if consistent:
        mis = aligned % bs != 0
        pos = torch.arange(n_pos)
        owner = torch.searchsorted(aligned[1:].contiguous(), pos, right=True).clamp(max=E_l - 1)
        pad_pos = (pos - aligned[owner] >= counts[owner]) if E_l else pos >= 0
        bad_pad = pad_pos & (sid != NK)
        starts = torch.arange(min(eid_raw.numel(), -(-n_pos // bs))) * bs
        b_owner = torch.searchsorted(aligned[1:].contiguous(), starts, right=True)
        eid = eid_raw.long()
        bad_blk = eid[:starts.numel()] != b_owner
        bad_tail = eid[starts.numel():] != -1
        if bool(mis.any() | bad_pad.any() | bad_blk.any() | bad_tail.any()):
            rep.add("alignment", "block alignment broken (offsets, sentinel padding or "
                    "expert_ids per block)", misaligned_experts=first(mis),
                    non_sentinel_padding=first(bad_pad), wrong_blocks=first(bad_blk),
                    tail_blocks_not_minus_one=first(bad_tail) + starts.numel())

    if rep.found:
        return
    diffs = [name for name, a, b in (
        ("expert_counts", counts, want.expert_counts), ("expert_offsets", offsets,
                                                       want.expert_offsets),
        ("aligned_offsets", aligned, want.aligned_offsets), ("permuted_row", perm,
                                                            want.permuted_row),
        ("sorted_token_ids", sorted_raw[:want.num_tokens_post_pad],
         want.sorted_token_ids[:want.num_tokens_post_pad]),
        ("expert_ids", eid_raw[:want.expert_ids.numel()], want.expert_ids))
        if not torch.equal(a.long(), b.long())]
    if post_pad != want.num_tokens_post_pad:
        diffs.append("num_tokens_post_pad")
    if diffs:
        x = first(perm != want.permuted_row.long())
        rep.add("matches-oracle", f"differs from the oracle's layout in {', '.join(diffs)}",
                differing=diffs, rows=x, permuted_row=perm[x],
                oracle_permuted_row=want.permuted_row[x])


def _at(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[index], -1 where an index is past the end of `t` (the oracle's layout may be shorter
    than the stage's)."""
    inside = index < t.numel()
    out = torch.full_like(index, -1)
    out[inside] = t[index[inside]].long()
    return out


def _same(a, b: torch.Tensor) -> bool:
    return (isinstance(a, torch.Tensor) and a.shape == b.shape
            and (torch.equal(a, b) if a.dtype == b.dtype else torch.equal(a.long(), b.long())))


def _same_layout(out, want) -> bool:
    """Is the stage's output the oracle's layout exactly (within the extents it must write)?"""
    n, blocks = want.num_tokens_post_pad, want.expert_ids.numel()
    sid, eid = out.sorted_token_ids, out.expert_ids
    return (isinstance(sid, torch.Tensor) and isinstance(eid, torch.Tensor)
            and sid.dim() == 1 and eid.dim() == 1
            and _same(out.expert_counts, want.expert_counts)
            and _same(out.expert_offsets, want.expert_offsets)
            and _same(out.aligned_offsets, want.aligned_offsets)
            and _same(out.permuted_row, want.permuted_row)
            and _same(sid[:n], want.sorted_token_ids[:n])
            and _same(eid[:blocks], want.expert_ids)
            and int(out.num_tokens_post_pad) == n)


# -- lora_align --------------------------------------------------------------------------------


def lora_align(res: RunResult, rep: Report) -> None:
    """no-poison, adapter-tokens, disabled-untouched: against oracle.lora_align."""
    inp, out = res.lora_in, res.lora_out
    want = oracle.lora_align(inp)
    L, E, bs = inp.max_loras, inp.num_experts, inp.block_size
    width, blocks = want.sorted_token_ids.shape[1], want.expert_ids.shape[1]
    sid = shape_of("sorted_token_ids", out.sorted_token_ids, (L, width))
    eid = shape_of("expert_ids", out.expert_ids, (L, blocks))
    npp = shape_of("num_tokens_post_pad", out.num_tokens_post_pad.reshape(-1), (L,))
    n = want.num_tokens_post_pad
    written = want.written
    pos_mask = (torch.arange(width) < n[:, None]) & written[:, None]
    blk_mask = (torch.arange(blocks) < (n // bs)[:, None]) & written[:, None]
    sid_poison, eid_poison, npp_poison = is_poison(sid), is_poison(eid), is_poison(npp)

    bad_poison = written & (npp_poison | (sid_poison & pos_mask).any(1)
                            | (eid_poison & blk_mask).any(1))
    if bool(bad_poison.any()):
        a = first(bad_poison)
        rep.add("no-poison", "an adapter's row that must be written holds poison", adapters=a,
                poisoned_positions=(sid_poison & pos_mask)[a].sum(1),
                num_tokens_post_pad_poison=npp_poison[a])

    # adapter-tokens: right totals, right expert per block, the right pairs in each expert's
    # run (in any order within a run: the real kernel's scatter order is not specified)
    bad = written & (npp.long() != n)
    bad |= ((eid.long() != want.expert_ids.long()) & blk_mask).any(1)
    a_idx, p_idx = torch.nonzero(pos_mask, as_tuple=True)
    if bool((sid[a_idx, p_idx] != want.sorted_token_ids[a_idx, p_idx]).any()):
        run = want.expert_ids.long()[a_idx, p_idx // bs]
        base = (a_idx * E + run) << 32
        got_keys = torch.sort(base + sid[a_idx, p_idx].long() + 2**31).values
        want_keys = torch.sort(base + want.sorted_token_ids[a_idx, p_idx].long() + 2**31).values
        differ = got_keys != want_keys
        if bool(differ.any()):
            bad[torch.unique(want_keys[differ] >> 32) // E] = True
    if bool(bad.any()):
        a = first(bad)
        rep.add("adapter-tokens", "an adapter's row does not hold exactly its tokens' pairs",
                adapters=a, num_tokens_post_pad=npp[a], expected_num_tokens_post_pad=n[a])

    untouched = want.untouched
    touched = untouched & ~(sid_poison.all(1) & eid_poison.all(1) & npp_poison)
    if bool(touched.any()):
        a = first(touched)
        rep.add("disabled-untouched", "a row of a disabled or absent adapter was written",
                adapters=a, written_positions=(~sid_poison[a]).sum(1))
