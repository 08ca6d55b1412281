"""Tests of stage 2, dispatch + sanitize and combine: against an explicit per-token loop,
padding and counter handling, the `a2a-unsanitized-padding` variant, the combine round trip."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness.bugs import BugSet
from harness.chain import StageContext
from harness.chain.dispatch import CombineInput, DispatchInput, combine_cpu, dispatch_cpu
from harness.errors import LaunchConfigError
from harness.memory import is_poison

UNSANITIZED = BugSet.of(["a2a-unsanitized-padding"])


def make_input(T: int, E: int, K: int, ep: int, seed: int = 0, extra_slots: int = 0,
               wild: bool = True, override: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> DispatchInput:
    """Routing with -1 and out-of-range ids (wild), an uneven expert -> rank map."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-2, E + 2) if wild else (0, E)
    ids = torch.randint(lo, hi, (T, K), generator=g, dtype=torch.int32)
    owner = torch.randint(0, ep, (E,), generator=g, dtype=torch.int32)
    M = -(-T // ep) + extra_slots
    garbage = torch.randint(0, 2 * E, (ep, ep, M, K), generator=g, dtype=torch.int32)
    return DispatchInput(ids, torch.rand((T, K), generator=g),
                         torch.randn((T, 5), generator=g).to(dtype), owner, ep, M, garbage,
                         override)


def reference(inp: DispatchInput):
    """Per destination and source, the tokens sent in order: {(dst, src): [token, ...]}."""
    T = inp.topk_ids.shape[0]
    ep, E = inp.ep_size, inp.rank_of_expert.numel()
    P = -(-T // ep)
    sent: dict[tuple[int, int], list[int]] = {(d, s): [] for d in range(ep) for s in range(ep)}
    for t in range(T):
        ranks = {int(inp.rank_of_expert[i]) for i in inp.topk_ids[t].tolist() if 0 <= i < E}
        for d in sorted(ranks):
            sent[(d, t // P)].append(t)
    return sent


def run(inp: DispatchInput, bugs: BugSet = BugSet()):
    ctx = StageContext(bugs=bugs)
    return dispatch_cpu(inp, ctx), ctx


def check_against_reference(inp: DispatchInput, out, sanitized: bool = True) -> None:
    M, ep = inp.max_tokens_per_rank, inp.ep_size
    sent = reference(inp)
    reported = (inp.recv_counters_override if inp.recv_counters_override is not None else
                torch.tensor([[len(sent[(d, s)]) for s in range(ep)] for d in range(ep)]))
    assert torch.equal(out.recv_counters, reported.to(torch.int32))
    for (d, s), tokens in sent.items():
        n = len(tokens)
        index = torch.tensor(tokens, dtype=torch.long)
        limit = min(max(int(reported[d, s]), 0), M)
        assert out.recv_token_index[d, s, :n].tolist() == tokens
        # a counter below the true count: sanitize also overwrites the ids of real slots
        kept = min(n, limit)
        assert torch.equal(out.recv_topk_ids[d, s, :kept], inp.topk_ids[index[:kept]])
        assert torch.equal(out.recv_topk_weights[d, s, :n], inp.topk_weights[index])
        assert torch.equal(out.recv_hidden[d, s, :n], inp.hidden_states[index])
        assert bool(is_poison(out.recv_hidden[d, s, n:]).all())
        assert bool(is_poison(out.recv_token_index[d, s, n:]).all())
        pad_ids = out.recv_topk_ids[d, s, limit:]
        if sanitized:
            assert bool((pad_ids == -1).all())
        else:
            assert torch.equal(pad_ids, inp.recv_garbage[d, s, limit:])
        # slots counted by an inflated counter but never written keep the garbage
        if n < limit:
            assert torch.equal(out.recv_topk_ids[d, s, n:limit], inp.recv_garbage[d, s, n:limit])


@pytest.mark.parametrize("ep", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("T,E,K", [(1, 8, 2), (16, 8, 2), (37, 13, 3), (64, 64, 6)])
def test_matches_reference(T, E, K, ep):
    if ep > E:
        pytest.skip("ep_size <= num_experts")
    inp = make_input(T, E, K, ep, seed=T * 7 + ep, extra_slots=ep % 3)
    out, ctx = run(inp)
    check_against_reference(inp, out)
    assert out.recv_topk_ids.shape == (ep, ep, inp.max_tokens_per_rank, K)
    assert out.recv_hidden.dtype == inp.hidden_states.dtype
    real_slots = sum(len(tokens) for tokens in reference(inp).values())
    padding = ep * ep * inp.max_tokens_per_rank - real_slots
    assert ctx.coverage["dispatch.sanitized_slots"] == padding


def test_bf16_hidden_and_coverage():
    inp = make_input(40, 16, 4, 4, seed=3, dtype=torch.bfloat16)
    inp.topk_ids[:, :] = -1  # nobody routes anything
    out, ctx = run(inp)
    check_against_reference(inp, out)
    assert ctx.coverage["dispatch.tokens_unsent"] == 40
    assert ctx.coverage["dispatch.empty_ranks"] == 4
    assert ctx.coverage["dispatch.unowned_ids"] == 160
    assert bool((out.recv_topk_ids == -1).all())


@pytest.mark.parametrize("ep", [1, 3, 4])
def test_override_counters_are_clamped(ep):
    M_extra = 2
    base = make_input(24, 12, 3, ep, seed=11, extra_slots=M_extra)
    M = base.max_tokens_per_rank
    g = torch.Generator().manual_seed(ep)
    override = torch.randint(-5, M + 6, (ep, ep), generator=g, dtype=torch.int32)
    override[0, 0], override[-1, -1] = M + 100, -100
    inp = make_input(24, 12, 3, ep, seed=11, extra_slots=M_extra, override=override)
    out, ctx = run(inp)
    check_against_reference(inp, out)
    assert ctx.coverage["dispatch.counter_clamped_high"] == int((override > M).sum())
    assert ctx.coverage["dispatch.counter_clamped_low"] == int((override < 0).sum())
    assert ctx.coverage["dispatch.counters_overridden"] == 1


def test_wild_ids_and_wild_owner_map_are_safe():
    inp = make_input(50, 10, 4, 4, seed=5)
    inp.topk_ids[::2] = torch.tensor([2**31 - 1, -2**31, -1, 10], dtype=torch.int32)
    inp.rank_of_expert[3] = 99  # an owner outside [0, ep): nobody
    inp.rank_of_expert[4] = -7
    out, _ = run(inp)
    assert not bool((out.recv_topk_ids.view(-1, 4)[:, 0] == 2**31 - 1).any())
    # tokens routed only to experts 3 / 4 / nowhere are not sent
    for t in range(50):
        ids = [i for i in inp.topk_ids[t].tolist() if 0 <= i < 10 and i not in (3, 4)]
        assert (t in out.recv_token_index.view(-1).tolist()) == bool(ids)


def test_unsanitized_variant_leaves_garbage():
    inp = make_input(30, 8, 2, 4, seed=2, extra_slots=3)
    out, ctx = run(inp, UNSANITIZED)
    check_against_reference(inp, out, sanitized=False)
    fixed, _ = run(inp)
    assert bool((fixed.recv_topk_ids != out.recv_topk_ids).any())
    assert ctx.coverage["dispatch.sanitized_slots"] == 0
    assert ctx.coverage["dispatch.padding_slots"] > 0


def test_padding_weights_are_deterministic_garbage():
    inp = make_input(30, 8, 2, 4, seed=2, extra_slots=3)
    a, _ = run(inp)
    b, _ = run(inp)
    assert torch.equal(a.recv_topk_weights, b.recv_topk_weights)
    assert bool(torch.isfinite(a.recv_topk_weights).all())


def test_launch_is_validated():
    inp = make_input(4, 4, 1, 1)
    inp.max_tokens_per_rank = 0
    inp.recv_garbage = torch.zeros((1, 1, 0, 1), dtype=torch.int32)
    with pytest.raises(LaunchConfigError):
        run(inp)


@given(st.integers(1, 40), st.integers(1, 12), st.integers(1, 4), st.integers(1, 8),
       st.integers(0, 3), st.booleans(), st.integers(0, 2**16))
def test_property_fixed_path(T, E, K, ep, extra, override, seed):
    ep, K = min(ep, E), min(K, E)
    counters = None
    if override:
        M = -(-T // ep) + extra
        g = torch.Generator().manual_seed(seed)
        counters = torch.randint(-2, M + 3, (ep, ep), generator=g, dtype=torch.int32)
    inp = make_input(T, E, K, ep, seed=seed, extra_slots=extra, override=counters)
    out, _ = run(inp)
    check_against_reference(inp, out)


def identity_outputs(out, M: int) -> torch.Tensor:
    """rank_outputs as if every expert were the identity: each slot's hidden row."""
    ep = out.recv_hidden.shape[0]
    rows = out.recv_hidden.to(torch.float32).reshape(ep, ep * M, -1)
    return torch.nan_to_num(rows, nan=0.0)  # padding rows are poison (NaN)


@pytest.mark.parametrize("ep", [1, 2, 5])
def test_combine_round_trip(ep):
    inp = make_input(33, 10, 3, ep, seed=ep, extra_slots=1)
    out, _ = run(inp)
    M = inp.max_tokens_per_rank
    got = combine_cpu(CombineInput(identity_outputs(out, M), out.recv_token_index,
                                   out.recv_counters, 33), StageContext())
    owner = inp.rank_of_expert.long()
    ids = inp.topk_ids.long()
    ranks = torch.stack([((ids == e) & (owner[e] == r)).any(1)
                         for r in range(ep) for e in range(10)]).view(ep, 10, 33).any(1)
    expected = inp.hidden_states * ranks.sum(0, keepdim=True).t()
    assert got.shape == (33, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_combine_skips_poison_and_garbage_token_indices():
    ep = 3
    inp = make_input(20, 9, 2, ep, seed=4, extra_slots=2, wild=False)
    out, _ = run(inp)
    M = inp.max_tokens_per_rank
    counters = out.recv_counters + 2  # counts two padding slots (poison token index) each
    token_index = out.recv_token_index.clone()
    token_index[0, 0, 0] = 10**6  # a fault
    ctx = StageContext()
    rank_outputs = torch.ones((ep, ep * M, 5))
    got = combine_cpu(CombineInput(rank_outputs, token_index, counters, 20), ctx)
    assert ctx.coverage["combine.bad_token_index"] == 2 * ep * ep + 1
    expected = torch.zeros(20)
    real = out.recv_token_index[~is_poison(out.recv_token_index)].long()
    expected.index_add_(0, real, torch.ones(real.numel()))
    expected[int(out.recv_token_index[0, 0, 0])] -= 1
    torch.testing.assert_close(got[:, 0], expected)


@pytest.mark.parametrize("T,extra", [(1, 0), (9, 0), (40, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bugs", [BugSet(), UNSANITIZED], ids=["fixed", "unsanitized"])
def test_one_rank_prefix_copy_is_the_general_send(monkeypatch, T, extra, dtype, bugs):
    """Without expert parallelism, with every id owned, the stage copies prefixes instead of
    scattering: the buffers, counters and coverage must be the general path's."""
    import harness.chain.dispatch as dispatch

    override = torch.tensor([[T - 1 if T > 1 else 0]], dtype=torch.int32)
    for ov in (None, override, torch.tensor([[T + extra + 3]])):
        inp = make_input(T, 8, 3, 1, seed=T, extra_slots=extra, wild=False, override=ov,
                         dtype=dtype)
        assert dispatch._send_all_to_one_rank(inp, dispatch._buffers(inp)) is not None
        fast, fast_ctx = run(inp, bugs)
        with monkeypatch.context() as m:
            m.setattr(dispatch, "_send_all_to_one_rank", lambda *a: None)
            slow, slow_ctx = run(inp, bugs)
        for name in ("recv_topk_ids", "recv_topk_weights", "recv_hidden", "recv_token_index",
                     "recv_counters"):
            a, b = getattr(fast, name), getattr(slow, name)
            assert a.dtype == b.dtype and torch.equal(a.view(torch.int8), b.view(torch.int8))
        assert fast_ctx.coverage == slow_ctx.coverage
    # an id outside [0, E) takes the general path: the token with only it is not sent
    inp = make_input(5, 8, 1, 1, seed=1, wild=False)
    inp.topk_ids[2] = 9
    out, ctx = run(inp)
    assert ctx.coverage["dispatch.tokens_unsent"] == 1 and int(out.recv_counters) == 4
