"""Tests of harness/chain/runner.py: what a run keeps (each stage's input as received, its
output before faults), where faults and overrides enter, how stage errors end a run, and the
torch mode runs execute in."""

from __future__ import annotations

import torch

from harness.backends.cpu import CpuTarget
from harness.bugs import BugSet
from harness.case import Fault, MoECase, Overrides
from harness.chain.runner import chain_mode, recv_garbage, run_case
from harness.errors import CaseError, ContractError, IllegalAccess, LaunchConfigError

I32 = torch.int32
CPU = CpuTarget()
BASE = MoECase(24, 8, 2, hidden_size=4, block_size=4, seed=7)
EP = MoECase(24, 8, 2, hidden_size=4, block_size=4, seed=7, ep_size=2, max_tokens_per_rank=16)


def test_a_clean_run_keeps_every_stage():
    res = run_case(EP, CPU)
    assert res.completed and res.findings == [] and res.rejected is None
    assert res.target == "cpu" and res.bugs == BugSet()
    assert [r.rank for r in res.ranks] == [0, 1]
    for rr in res.ranks:
        assert rr.sort_out is not None and rr.finalize_out.shape == (2 * 16, 4)
    assert res.output.shape == (24, 4)
    assert set(res.seconds) == {"gating", "dispatch", "sort_align", "experts", "finalize",
                                "combine"}
    assert res.lora_in is None  # max_loras = 0: no LoRA stage
    # without faults a stage receives exactly what the previous one produced
    assert res.dispatch_in.topk_ids is res.gating_out.topk_ids
    assert res.ranks[0].finalize_in.expert_out is res.ranks[0].experts_out.expert_out


def test_gating_fault_reaches_dispatch_and_lora_not_the_gating_output():
    fault = Fault("gating", "topk_ids", "drop", rows=(0, 5))
    case = BASE.replace(faults=(fault,), max_loras=2)
    clean = run_case(BASE.replace(max_loras=2), CPU)
    res = run_case(case, CPU)
    assert torch.equal(res.gating_out.topk_ids, clean.gating_out.topk_ids)  # before the fault
    received = res.dispatch_in.topk_ids
    assert received[[0, 5]].eq(-1).all() and torch.equal(received[1:5], clean.gating_out
                                                          .topk_ids[1:5])
    assert res.lora_in.topk_ids is received  # LoRA align sees the routed (faulted) ids
    assert torch.equal(res.dispatch_in.topk_weights, res.gating_out.topk_weights)


def test_faults_at_each_later_boundary_change_only_the_next_stage_input():
    faults = (Fault("dispatch", "recv_topk_ids", "drop", rows=(0,)),
              Fault("sort_align", "permuted_row", "garbage", rows=(1,)),
              Fault("experts", "expert_out", "nan", rows=(2,)))
    clean = run_case(BASE, CPU)
    res = run_case(BASE.replace(faults=faults), CPU)
    rr, cr = res.ranks[0], clean.ranks[0]
    # dispatch output kept before the fault; sort_align received the faulted slots
    assert torch.equal(res.dispatch_out.recv_topk_ids, clean.dispatch_out.recv_topk_ids)
    assert rr.sort_in.topk_ids[0].eq(-1).all()
    assert torch.equal(rr.sort_in.topk_ids[1:], cr.sort_in.topk_ids[1:])
    # sort_align's own permutation is kept; finalize got it with entry 1 garbage
    produced, got = rr.sort_out.permuted_row, rr.finalize_in.permuted_row
    others = torch.arange(got.numel()) != 1
    assert got[1] != produced[1] and torch.equal(got[others], produced[others])
    assert rr.experts_in.sorted_token_ids is rr.sort_out.sorted_token_ids  # not faulted
    # experts output kept as computed; finalize read the NaN row
    assert torch.isfinite(rr.experts_out.expert_out[2]).all()
    assert torch.isnan(rr.finalize_in.expert_out[2]).all()
    assert torch.equal(rr.finalize_in.expert_out[3:].view(I32),  # the rest bit for bit,
                       rr.experts_out.expert_out[3:].view(I32))  # poison padding included


def test_overrides_enter_mid_chain_and_are_not_modified():
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]] * 6, dtype=I32)
    before = ids.clone()
    case = BASE.replace(overrides=Overrides(topk_ids=ids),
                        faults=(Fault("gating", "topk_ids", "zero_rows", rows=(0,)),))
    res = run_case(case, CPU)
    assert res.gating_in is None and res.gating_out is None  # gating skipped
    assert res.dispatch_in.topk_ids[0].tolist() == [0, 0]  # the fault hit the routed copy
    assert torch.equal(res.dispatch_in.topk_ids[1:], ids[1:])
    assert torch.equal(ids, before)  # the case's override is untouched
    assert torch.equal(res.dispatch_in.topk_weights, torch.full((24, 2), 0.5))  # default 1/K
    weights = torch.rand(24, 2, generator=torch.Generator().manual_seed(0))
    res = run_case(BASE.replace(overrides=Overrides(topk_ids=ids, topk_weights=weights)), CPU)
    assert torch.equal(res.dispatch_in.topk_weights, weights)
    counters = torch.tensor([[3, 0], [1, 16]], dtype=I32)
    res = run_case(EP.replace(overrides=Overrides(recv_counters=counters)), CPU)
    assert torch.equal(res.dispatch_in.recv_counters_override, counters)
    assert torch.equal(res.dispatch_out.recv_counters, counters)
    lora_ids = torch.tensor([-1, 1, 0], dtype=I32)
    res = run_case(BASE.replace(max_loras=2, overrides=Overrides(lora_ids=lora_ids)), CPU)
    assert torch.equal(res.lora_in.lora_ids, lora_ids)


class _Raising(CpuTarget):
    """The CPU model, but one stage raises the given error."""

    def __init__(self, stage: str, error: Exception) -> None:
        self.stage, self.error = stage, error

    def __getattribute__(self, name):
        if name == object.__getattribute__(self, "stage"):
            def fail(inp, ctx):
                raise object.__getattribute__(self, "error")
            return fail
        return object.__getattribute__(self, name)


def test_illegal_access_becomes_a_finding_and_ends_the_run():
    err = IllegalAccess("experts", "hidden_states", 99, 24)
    res = run_case(EP, _Raising("experts", err))
    (f,) = res.findings
    assert (f.signature, f.severity) == ("experts:illegal-access", "legal")
    assert f.details == {"buffer": "hidden_states", "index": 99, "size": 24,
                         "kind": "out-of-bounds"}
    assert res.ranks[0].experts_out is None and res.ranks[0].finalize_in is None
    assert len(res.ranks) == 1 and res.output is None and not res.completed
    # the finding carries the case's severity
    faulted = EP.replace(faults=(Fault("gating", "topk_weights", "nan", rows=(0,)),))
    assert run_case(faulted, _Raising("experts", err)).findings[0].severity == "fault"


def test_launch_config_error_becomes_a_finding():
    err = LaunchConfigError("sort_align", "grid.y = 70000 outside 1..65535", (1, 70000, 1),
                            (256, 1, 1))
    res = run_case(BASE, _Raising("sort_align", err))
    (f,) = res.findings
    assert f.signature == "sort_align:launch-config"
    assert f.details == {"grid": [1, 70000, 1], "block": [256, 1, 1]}
    assert res.ranks[0].sort_out is None and res.output is None
    # the real one: the unchunked experts launch of grid-y-overflow
    big = MoECase(65536, 1, 1, block_size=1, hidden_size=1)
    res = run_case(big, CPU, BugSet.of(["grid-y-overflow"]))
    assert [f.signature for f in res.findings] == ["experts:launch-config"]


def test_contract_error_is_a_clean_rejection():
    res = run_case(BASE, _Raising("dispatch", ContractError("dispatch", "out of domain")))
    assert res.findings == [] and isinstance(res.rejected, ContractError)
    assert res.dispatch_out is None and res.ranks == [] and not res.completed


def test_recv_garbage_is_deterministic_and_half_out_of_range():
    g = recv_garbage(EP)
    assert g.shape == (2, 2, 16, 2) and g.dtype == I32
    assert torch.equal(g, recv_garbage(EP))
    assert 0 <= int(g.min()) and int(g.max()) < 16 and bool((g >= 8).any())


def test_chain_mode_restores_threads_and_makes_inference_tensors():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with chain_mode():
            assert torch.get_num_threads() == 1 and torch.is_inference_mode_enabled()
        assert torch.get_num_threads() == 2 and not torch.is_inference_mode_enabled()
        try:
            run_case(BASE.replace(topk=9), CPU)  # invalid: raises inside the mode
        except CaseError:
            pass
        assert torch.get_num_threads() == 2
        res = run_case(BASE, CPU)
        assert res.output.is_inference()
        copy = res.output.clone()  # outside the mode: an ordinary tensor, writable
        copy[0, 0] = 1.0
    finally:
        torch.set_num_threads(threads)


def test_expert_placement_is_shared_and_per_rank():
    placed = EP.replace(expert_to_rank=(1, 1, 0, 1, 0, 1, 1, 1))
    res = run_case(placed, CPU)
    assert [rr.sort_in.num_local_experts for rr in res.ranks] == [2, 6]
    assert res.ranks[0].sort_in.expert_map.tolist() == [-1, -1, 0, -1, 1, -1, -1, -1]
    assert res.ranks[0].experts_in.expert_weights.shape[0] == 2
    assert torch.equal(res.ranks[0].experts_in.expert_weights, res.tensors.expert_weights[[2, 4]])
    again = run_case(placed, CPU)
    assert again.dispatch_in.rank_of_expert is res.dispatch_in.rank_of_expert  # computed once
