"""The `cpu` backend: the chain's CPU model (`harness.chain.*_cpu`), variants included."""

from __future__ import annotations

from harness.chain.dispatch import combine_cpu, dispatch_cpu
from harness.chain.experts import experts_cpu, finalize_cpu
from harness.chain.gating import gating_cpu
from harness.chain.lora_align import lora_align_cpu
from harness.chain.sort_align import sort_align_cpu
from harness.chain.target import Target


class CpuTarget(Target):
    """A faithful CPU model of the kernels, with checked buffers and poison: each stage is
    the stage module's `*_cpu` function itself."""

    name = "cpu"
    gating = staticmethod(gating_cpu)
    dispatch = staticmethod(dispatch_cpu)
    sort_align = staticmethod(sort_align_cpu)
    experts = staticmethod(experts_cpu)
    finalize = staticmethod(finalize_cpu)
    combine = staticmethod(combine_cpu)
    lora_align = staticmethod(lora_align_cpu)
