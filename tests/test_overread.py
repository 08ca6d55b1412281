"""Out-of-bounds reads show (issue 10, item 5): a stage that reads one element past an input
buffer yields a finding, on the cpu model and on the cuda backend.

The over-read is staged the way it happens on a device: the buffer handed to the stage is one
element shorter than the stage believes, so its last element is the first element of the
guard band (`harness.memory.guarded` on the CPU, the `_Guarded` band on cuda). Everything
else the stage does is correct, so the only wrong value is the guard's: the test shows the
guard holds a value the checks trip on (an id far out of range, a NaN), where a plausible
value (0xA5A5A5A5 read as a float is -2.9e-16; 0xCDCDCDCD a negative id) could pass.

Each (stage, buffer) gets a case where that buffer's last element matters: block_size 1 (every
sorted position and m-block is real), one rank with as many receive slots as tokens (no
padding), expert E-1 in every token's top-K, every LoRA slot active. Buffers whose last
element a correct stage never uses, or whose value it clamps into range, are left out with the
reason (`BENIGN`).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_cuda_backend import FakeExtension

from harness.api import execute
from harness.backends import cuda as cuda_backend
from harness.backends.cpu import CpuTarget
from harness.backends.cuda import CudaTarget, _Guarded, _Launch
from harness.case import MoECase, Overrides
from harness.memory import guarded

gpu = pytest.mark.gpu
T, E, K, L = 8, 8, 2, 2

#: (stage, input field) of the CPU model's stages, and the case each one is read in
CPU_BUFFERS = [
    ("gating", "gating_logits"), ("gating", "correction_bias"),
    ("dispatch", "topk_ids"), ("dispatch", "topk_weights"), ("dispatch", "hidden_states"),
    ("dispatch", "rank_of_expert"),
    ("sort_align", "topk_ids"), ("sort_align", "expert_map"),
    ("experts", "hidden_states"), ("experts", "expert_weights"),
    ("experts", "sorted_token_ids"), ("experts", "expert_ids"),
    ("finalize", "expert_out"), ("finalize", "permuted_row"), ("finalize", "topk_weights"),
    ("combine", "rank_outputs"), ("combine", "recv_token_index"),
    ("lora_align", "topk_ids"), ("lora_align", "token_lora_mapping"),
    ("lora_align", "lora_ids"),
]
#: buffers left out: a correct stage cannot be told from one that over-reads them
BENIGN = {
    ("dispatch", "recv_garbage"): "stale memory by definition: any value is legal there",
    ("combine", "recv_counters"): "counters are clamped to [0, M]: a full last (dst, src) "
                                  "pair reads the same with any value >= M",
    ("lora_align", "adapter_enabled"): "its last entry is padding, read only for an id of "
                                       "max_loras (the lora-id-unchecked variant)",
}
#: the cuda backend's kernel inputs (run.input names; dispatch routing and combine are torch
#: ops on the device, not kernels reading a guarded buffer)
CUDA_BUFFERS = [
    ("gating", "gating_logits"), ("gating", "correction_bias"),
    ("sort_align", "topk_ids"), ("sort_align", "expert_map"),
    ("experts", "hidden_states"), ("experts", "expert_weights"),
    ("experts", "sorted_token_ids"), ("experts", "expert_ids"),
    ("finalize", "expert_out"), ("finalize", "permuted_row"), ("finalize", "topk_weights"),
    ("lora_align", "topk_ids"), ("lora_align", "token_lora_mapping"),
    ("lora_align", "lora_ids"),
]


def case_for(stage: str, buffer: str) -> MoECase:
    """A legal case in which `buffer`'s last element is used by `stage`."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn((T, E), generator=g)
    logits[:, E - 1] += 6.0  # expert E-1 in every token's top-K
    lora = stage == "lora_align"
    # the base model and both adapters present (lora_ids has no -1 padding), the last token
    # on an adapter
    mapping = torch.tensor([-1, 0, 1, 0, 1, 0, 1, 1], dtype=torch.int32)
    bias = torch.full((E,), 0.5) if buffer == "correction_bias" else None
    # one rank: dispatch copies a prefix and never reads rank_of_expert; two for that one
    ep = 2 if buffer == "rank_of_expert" else 1
    return MoECase(T, E, K, hidden_size=4, block_size=1, seed=5, renormalize=True,
                   correction_bias=bias, ep_size=ep,
                   max_loras=L if lora else 0,
                   overrides=Overrides(gating_logits=logits,
                                       token_lora_mapping=mapping if lora else None))


def short_by_one(t: torch.Tensor, canary: int | None = None) -> torch.Tensor:
    """`t`'s shape over a copy of all but its last element: that element is the guard's
    (the run's poison, or every byte `canary` as the cuda guards held before)."""
    inner = guarded(t.reshape(-1)[:-1].contiguous())
    if canary is not None:
        flat = inner.as_strided((inner.numel() + 1,), (1,), inner.storage_offset())
        flat[-1:].view(torch.uint8).fill_(canary)
    return inner.as_strided(tuple(t.shape), torch.empty(t.shape).stride(),
                            inner.storage_offset())


class OverreadingCpu(CpuTarget):
    """The cpu model, except that `stage` reads one element past its input `buffer`."""

    def __init__(self, stage: str, buffer: str, canary: int | None = None) -> None:
        self.stage, self.buffer, self.canary = stage, buffer, canary

    def __getattribute__(self, name: str):
        method = super().__getattribute__(name)
        if name != object.__getattribute__(self, "stage"):
            return method
        buffer = object.__getattribute__(self, "buffer")
        canary = object.__getattribute__(self, "canary")

        def overreading(inp, ctx):
            return method(dataclasses.replace(inp, **{
                buffer: short_by_one(getattr(inp, buffer), canary)}), ctx)
        return overreading


def _signatures(case: MoECase, target) -> list[str]:
    return [f.signature for f in execute(case, target).findings]


def test_short_by_one_reads_the_guard():
    t = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    over = short_by_one(t)
    assert over.shape == t.shape and over.reshape(-1)[:5].tolist() == [0, 1, 2, 3, 4]
    assert int(over[1, 2]) > 2**31 - 2**24  # the guard: an id far out of every range
    f = short_by_one(torch.ones(4, dtype=torch.float16))
    assert bool(torch.isnan(f[-1])) and not bool(torch.isnan(f[:-1]).any())


@pytest.mark.parametrize("stage,buffer", CPU_BUFFERS)
def test_cpu_stage_reading_past_an_input_is_found(stage, buffer):
    case = case_for(stage, buffer)
    assert _signatures(case, CpuTarget()) == []  # the case is clean on the correct model
    found = _signatures(case, OverreadingCpu(stage, buffer))
    assert found, f"{stage} reading one past {buffer} went unnoticed"


def test_a_plausible_guard_hides_overreads():
    """The control: with the old cuda canary (0xA5 bytes: a tiny negative float, a negative
    id) in the guard, some of the same over-reads pass every check."""
    hidden = [(stage, buffer) for stage, buffer in CPU_BUFFERS
              if not _signatures(case_for(stage, buffer),
                                 OverreadingCpu(stage, buffer, canary=0xA5))]
    assert ("gating", "correction_bias") in hidden, hidden  # -2.9e-16 on top of 0.5


def test_benign_buffers_are_not_in_the_list():
    assert not set(BENIGN) & set(CPU_BUFFERS)


# -- cuda: the kernel's input buffer is one element short (its last read lands in the guard) --


@pytest.fixture
def overread_input(monkeypatch):
    """Make the named (stage, buffer) input of every `_Launch` one element short."""
    wanted: list[tuple[str, str]] = []
    original = _Launch.input

    def short_input(self, name, t, lead=cuda_backend.REDZONE_BYTES,
                    trail=cuda_backend.REDZONE_BYTES):
        if (self.stage, name) not in wanted or not self.target.checks or t.numel() < 1:
            return original(self, name, t, lead, trail)
        flat = t.reshape(-1)
        buf = _Guarded(name, (flat.numel() - 1,), t.dtype, self.target.device, lead, trail)
        self.buffers.append(buf)
        buf.data.copy_(flat[:-1].to(self.target.device))
        nbytes = t.numel() * buf.itemsize
        return buf.raw[buf.lead:buf.lead + nbytes].view(t.dtype).view(t.shape)

    monkeypatch.setattr(_Launch, "input", short_input)
    return wanted


def _cuda_overread_finds(target: CudaTarget, wanted: list, stage: str, buffer: str) -> None:
    case = case_for(stage, buffer)
    assert _signatures(case, target) == []
    wanted.append((stage, buffer))
    found = _signatures(case, target)
    assert found, f"cuda {stage} reading one past {buffer} went unnoticed"


@pytest.mark.parametrize("stage,buffer", CUDA_BUFFERS)
def test_cuda_host_side_overread_is_found(overread_input, stage, buffer):
    """The cuda backend's buffers over the stand-in extension (the CPU model in the given
    tensors): the guard band's value reaches the checks."""
    target = CudaTarget(device="cpu", ext=FakeExtension())
    _cuda_overread_finds(target, overread_input, stage, buffer)


@gpu
@pytest.mark.parametrize("stage,buffer", CUDA_BUFFERS)
def test_cuda_kernel_reading_past_an_input_is_found(overread_input, stage, buffer):
    """The real kernels reading the guard band of a one-short input buffer."""
    _cuda_overread_finds(CudaTarget(), overread_input, stage, buffer)
