"""Executors: in-process for the cpu backend, a restartable worker for targets that can crash,
hang or poison their process. The worker is tested on the CPU with a target that does each."""

from __future__ import annotations

import os
import time

import pytest

from harness import corpus
from harness.backends.cpu import CpuTarget
from harness.case import MoECase, Patch
from harness.errors import BackendUnavailable, IllegalAccess
from harness.fuzz import codec
from harness.fuzz.worker import InProcessExecutor, WorkerExecutor, make_executor

#: token counts at which `FaultyTarget` misbehaves
CRASH_T, HANG_T, STICKY_T = 13, 17, 19
NAN_CASE = MoECase(8, 8, 2, patches=(Patch("gating_logits", "row", "nan", row=3),))


class FaultyTarget(CpuTarget):
    """The CPU model, except: gating kills the process at T = 13, sort_align hangs at T = 17,
    experts hits a "sticky error" at T = 19 (the target is unusable afterwards)."""

    name = "faulty"

    def __init__(self) -> None:
        self.dead = False

    def gating(self, inp, ctx):
        if inp.gating_logits.shape[0] == CRASH_T:
            os._exit(3)
        return super().gating(inp, ctx)

    def sort_align(self, inp, ctx):
        if inp.topk_ids.shape[0] == HANG_T:
            time.sleep(600)
        return super().sort_align(inp, ctx)

    def experts(self, inp, ctx):
        if inp.hidden_states.shape[0] == STICKY_T:
            self.dead = True
            raise IllegalAccess("experts", "<device>", -1, -1, "illegal-address")
        return super().experts(inp, ctx)

    def check_usable(self) -> None:
        if self.dead:
            raise BackendUnavailable("poisoned by a sticky error")


def faulty_target() -> FaultyTarget:
    return FaultyTarget()


def _sigs(outcome) -> set[str]:
    return {f.signature for f in outcome.findings}


def test_in_process_executor_gives_findings_and_features():
    with make_executor("cpu", ("topk-nan-argmax",)) as ex:
        assert isinstance(ex, InProcessExecutor)
        out = ex.run(NAN_CASE)
    assert "gating:unique-ids" in _sigs(out) and out.features and not out.restarted
    assert not make_executor("cpu").run(NAN_CASE).findings


class BrokenTarget(CpuTarget):
    """A target with a defect: dispatch raises a plain Python error."""

    def dispatch(self, inp, ctx):
        raise ValueError("a defect")


def test_a_defect_of_the_target_is_an_internal_finding_not_a_crash():
    out = InProcessExecutor(BrokenTarget()).run(MoECase(8, 8, 2))
    assert _sigs(out) == {"internal:ValueError"} and "a defect" in out.findings[0].message
    assert f"{__name__}.py:" in out.findings[0].details["location"]  # where it was raised


def test_worker_matches_in_process_and_survives_crash_hang_and_sticky_error():
    with WorkerExecutor(f"{__name__}:faulty_target", ("topk-nan-argmax",), timeout=3.0) as ex:
        first = ex.run(NAN_CASE)
        here = InProcessExecutor(FaultyTarget(), ("topk-nan-argmax",)).run(NAN_CASE)
        assert _sigs(first) == _sigs(here) and first.features == here.features

        crashed = ex.run(MoECase(CRASH_T, 8, 2))
        assert _sigs(crashed) == {"gating:crash"} and crashed.restarted
        assert "exit code 3" in crashed.findings[0].message

        start = time.monotonic()
        hung = ex.run(MoECase(HANG_T, 8, 2))  # a fresh worker after the crash, then a hang
        assert _sigs(hung) == {"sort_align:hang"} and hung.restarted
        assert time.monotonic() - start < 60

        data = codec.encode(NAN_CASE)  # a fuzz input crosses as bytes, decoded in the worker
        case, by_bytes = ex.run_input(data, codec.LIMITS)
        assert corpus.content_hash(case) == corpus.content_hash(NAN_CASE)
        assert _sigs(by_bytes) == _sigs(first) and by_bytes.features == first.features

        sticky = ex.run(MoECase(STICKY_T, 8, 2))
        assert "experts:illegal-access" in _sigs(sticky) and sticky.restarted
        assert _sigs(ex.run(NAN_CASE)) == _sigs(first)  # and the loop goes on
        assert ex.restarts == 3


def test_worker_with_a_target_that_cannot_load():
    with pytest.raises(BackendUnavailable, match="no_such_module_xyz"):
        WorkerExecutor("no_such_module_xyz:factory")
    with WorkerExecutor(f"{__name__}:no_such_factory") as ex, \
            pytest.raises(BackendUnavailable, match="no_such_factory"):
        ex.run(MoECase(8, 8, 2))
