"""The `cpu` backend: the chain's CPU model (`harness.chain.*_cpu`), variants included."""

from __future__ import annotations

from harness.chain.dispatch import combine_cpu, dispatch_cpu
from harness.chain.experts import experts_cpu, finalize_cpu
from harness.chain.gating import gating_cpu
from harness.chain.lora_align import lora_align_cpu
from harness.chain.sort_align import sort_align_cpu
from harness.chain.target import Target


class CpuTarget(Target):
    """A faithful CPU model of the kernels, with checked buffers and poison."""

    name = "cpu"

    def gating(self, inp, ctx):
        return gating_cpu(inp, ctx)

    def dispatch(self, inp, ctx):
        return dispatch_cpu(inp, ctx)

    def sort_align(self, inp, ctx):
        return sort_align_cpu(inp, ctx)

    def experts(self, inp, ctx):
        return experts_cpu(inp, ctx)

    def finalize(self, inp, ctx):
        return finalize_cpu(inp, ctx)

    def combine(self, inp, ctx):
        return combine_cpu(inp, ctx)

    def lora_align(self, inp, ctx):
        return lora_align_cpu(inp, ctx)
