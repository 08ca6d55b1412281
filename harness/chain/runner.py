"""The runner: materialise a case, run the chain stage by stage on a target, apply faults.

Every stage's input (as the stage received it, after upstream faults) and output (as the stage
produced it, before faults) is kept in the `RunResult`, so invariants check each stage against
exactly what it was given. An `IllegalAccess` or `LaunchConfigError` ends the run with a finding
naming the stage; a `ContractError` ends it as a clean rejection. Runs execute in `chain_mode`
(inference mode, one intra-op thread): thousands of small ops, where torch's per-op overhead is
the cost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Iterator

import torch

from harness.bugs import FIXED, BugSet
from harness.case import MoECase, generator, materialize
from harness.chain import StageContext
from harness.chain.dispatch import CombineInput, DispatchInput
from harness.chain.experts import ExpertsInput, FinalizeInput
from harness.chain.faults import apply_fault
from harness.chain.gating import GatingInput, GatingOutput
from harness.chain.lora_align import LoraAlignInput
from harness.chain.result import RankRun, RunResult
from harness.chain.sort_align import SortAlignInput
from harness.chain.target import Target
from harness.errors import ContractError, IllegalAccess, LaunchConfigError
from harness.findings import Finding
from harness.memory import vary_poison


class _Stop(Exception):
    """Internal: a stage failed and the run ends here."""


def _faulted(case: MoECase, boundary: str, out):
    """`out` with the case's faults at `boundary` applied to their tensors (a copy)."""
    faults = [f for f in case.faults if f.boundary == boundary]
    if not faults:
        return out
    changes: dict[str, torch.Tensor] = {}
    for f in faults:
        changes[f.tensor] = apply_fault(changes.get(f.tensor, getattr(out, f.tensor)), f)
    return dataclasses.replace(out, **changes)


@functools.lru_cache(maxsize=64)
def _ownership(num_experts: int, ep_size: int, expert_to_rank: tuple[int, ...] | None
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """(rank_of_expert [E] int32, expert_map [ep, E] int32, each rank's global expert ids
    (int64)): constants of the expert placement, computed once per placement (read-only)."""
    case = MoECase(1, num_experts, 1, ep_size=ep_size, expert_to_rank=expert_to_rank)
    owner = case.rank_of_expert()
    local = tuple(torch.nonzero(owner == r).flatten() for r in range(ep_size))
    return owner, case.expert_map(), local


def recv_garbage(case: MoECase) -> torch.Tensor:
    """What the receive buffers' padding slots hold before sanitize: expert ids of an earlier
    step, in [0, 2E) (half of them out of range), [ep, ep, M, K] int32."""
    shape = (case.ep_size, case.ep_size, case.recv_slots, case.topk)
    return torch.randint(0, 2 * case.num_experts, shape, generator=generator(case.seed, "garbage"),
                         dtype=torch.int32)


#: intra-op threads of a run. One: most of a run's ops are on small tensors, where an OpenMP
#: fork/join costs more than the op, and on a busy machine (a fuzzer's parallel workers, CI)
#: even the large ones lose: the 400,000-token gating ran ~10x slower on 2 threads than on 1
#: on the 2-core CI box. Parallelism comes from running cases in parallel processes.
CHAIN_THREADS = 1


@contextlib.contextmanager
def chain_mode(case: MoECase | None = None) -> Iterator[None]:
    """The torch state a run (and its checks) executes in: inference mode (no autograd
    bookkeeping on the thousands of small ops) and CHAIN_THREADS intra-op threads.

    Tensors created inside are inference tensors: read them anywhere, but write them in
    place only inside this context (a clone made outside it is an ordinary tensor). The
    thread count is restored on exit. (`case` is accepted and unused: the mode is the same for
    every case.)
    """
    threads = torch.get_num_threads()
    fewer = threads > CHAIN_THREADS
    with torch.inference_mode():
        if fewer:
            torch.set_num_threads(CHAIN_THREADS)
        try:
            yield
        finally:
            if fewer:
                torch.set_num_threads(threads)


def run_case(case: MoECase, target: Target, bugs: BugSet = FIXED) -> RunResult:
    """Run `case` once on `target` with `bugs` on. Raises `CaseError` for an invalid case.

    The stages run in `chain_mode`; a target that runs the whole chain at once (CUDA graphs)
    runs outside it, since it keeps device buffers from run to run that it also fills outside
    a run (an inference tensor may not be written there). The run's poison is the family's
    word for the case's seed (`memory.vary_poison`): varied per case, the same for a replay."""
    vary_poison(case.seed)
    whole = target.run_chain(case, bugs)
    if whole is not None:
        return whole
    with chain_mode():
        tensors = materialize(case)
        res = RunResult(case, bugs, target.name, tensors)
        ctx = StageContext(bugs=bugs, coverage=res.coverage)
        try:
            _run(case, target, ctx, res)
        except _Stop:
            pass
    return res


def _call(res: RunResult, stage: str, fn, *args):
    start = time.perf_counter()
    try:
        return fn(*args)
    except (IllegalAccess, LaunchConfigError) as exc:
        check = "illegal-access" if isinstance(exc, IllegalAccess) else "launch-config"
        details = ({"buffer": exc.buffer, "index": exc.index, "size": exc.size, "kind": exc.kind}
                   if isinstance(exc, IllegalAccess) else {"grid": list(exc.grid),
                                                           "block": list(exc.block)})
        res.findings.append(Finding(exc.stage or stage, check, str(exc), res.case.severity,
                                    details))
        raise _Stop from None
    except ContractError as exc:
        res.rejected = exc
        raise _Stop from None
    finally:
        res.seconds[stage] = res.seconds.get(stage, 0.0) + time.perf_counter() - start


def _run(case: MoECase, target: Target, ctx: StageContext, res: RunResult) -> None:
    t = res.tensors
    T, K, H = case.num_tokens, case.topk, case.hidden_size
    o = case.overrides

    # 1. gating (skipped when the case enters the chain at topk_ids)
    if o.topk_ids is None:
        res.gating_in = GatingInput(t.gating_logits, t.correction_bias, K, case.scoring,
                                    case.renormalize)
        res.gating_out = _call(res, "gating", target.gating, res.gating_in, ctx)
        routed = _faulted(case, "gating", res.gating_out)
    else:
        weights = o.topk_weights if o.topk_weights is not None else torch.full((T, K), 1.0 / K)
        routed = _faulted(case, "gating", GatingOutput(o.topk_ids.clone(),
                                                       weights.to(torch.float32).clone()))

    # 5. LoRA align, beside the chain, on the routed ids
    if case.max_loras > 0:
        res.lora_in = LoraAlignInput(routed.topk_ids, t.token_lora_mapping, t.lora_ids,
                                     t.adapter_enabled, case.num_experts, case.block_size,
                                     case.max_loras)
        res.lora_out = _call(res, "lora_align", target.lora_align, res.lora_in, ctx)

    # 2. dispatch + sanitize
    owner, expert_map, local_experts = _ownership(case.num_experts, case.ep_size,
                                                  case.expert_to_rank)
    res.dispatch_in = DispatchInput(routed.topk_ids, routed.topk_weights, t.hidden_states,
                                    owner, case.ep_size, case.recv_slots,
                                    recv_garbage(case), o.recv_counters)
    res.dispatch_out = _call(res, "dispatch", target.dispatch, res.dispatch_in, ctx)
    recv = _faulted(case, "dispatch", res.dispatch_out)

    # 3.-4. per destination rank: sort_align -> experts -> finalize
    ep, M = case.ep_size, case.recv_slots
    rank_outputs: list[torch.Tensor] = []
    for r in range(ep):
        rr = RankRun(r)
        res.ranks.append(rr)
        local = local_experts[r]
        rr.sort_in = SortAlignInput(recv.recv_topk_ids[r].reshape(ep * M, K), expert_map[r],
                                    local.numel(), case.block_size)
        rr.sort_out = _call(res, "sort_align", target.sort_align, rr.sort_in, ctx)
        aligned = _faulted(case, "sort_align", rr.sort_out)
        weights = t.expert_weights if ep == 1 else t.expert_weights.index_select(0, local)
        rr.experts_in = ExpertsInput(recv.recv_hidden[r].reshape(ep * M, H),
                                     weights, aligned.sorted_token_ids,
                                     aligned.expert_ids, aligned.num_tokens_post_pad, K,
                                     case.block_size)
        rr.experts_out = _call(res, "experts", target.experts, rr.experts_in, ctx)
        computed = _faulted(case, "experts", rr.experts_out)
        rr.finalize_in = FinalizeInput(computed.expert_out, aligned.permuted_row,
                                       recv.recv_topk_weights[r].reshape(ep * M, K))
        rr.finalize_out = _call(res, "finalize", target.finalize, rr.finalize_in, ctx)
        rank_outputs.append(rr.finalize_out)

    stacked = rank_outputs[0].unsqueeze(0) if ep == 1 else torch.stack(rank_outputs)
    combine_in = CombineInput(stacked, recv.recv_token_index, recv.recv_counters, T)
    res.output = _call(res, "combine", target.combine, combine_in, ctx)
