"""GPU choice per worker (harness/gpus.py), against a stand-in for NVML."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from harness import gpus
from harness.errors import HarnessError


class FakeNVML:
    """The few pynvml calls `harness.gpus` makes, over a table of free bytes per GPU."""

    def __init__(self, free: list[int], fail_init: bool = False,
                 util: list[int] | None = None) -> None:
        self.free = free
        self.fail_init = fail_init
        self.util = util or [0] * len(free)
        self.open = False

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")
        self.open = True

    def nvmlShutdown(self) -> None:
        self.open = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.free)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        assert self.open
        return i

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        if handle >= len(self.free):
            raise RuntimeError("NVML_ERROR_INVALID_ARGUMENT")
        return SimpleNamespace(free=self.free[handle], total=80 << 30,
                               used=(80 << 30) - self.free[handle])

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=self.util[handle], memory=0)


def test_free_memory_reads_every_gpu_and_shuts_nvml_down():
    nvml = FakeNVML([5, 9, 7])
    assert gpus.free_memory(nvml) == {0: 5, 1: 9, 2: 7}
    assert not nvml.open


def test_workers_take_gpus_by_free_memory_round_robin():
    nvml = FakeNVML([5 << 30, 9 << 30, 7 << 30, 1 << 30])
    assert [gpus.choose_gpu(w, nvml=nvml) for w in range(6)] == [1, 2, 0, 3, 1, 2]


def test_candidates_restrict_the_choice():
    nvml = FakeNVML([5, 9, 7, 1])
    assert [gpus.choose_gpu(w, [0, 3], nvml=nvml) for w in range(3)] == [0, 3, 0]
    assert gpus.choose_gpu(0, [7, 8], nvml=nvml) is None  # none of them exists


def test_ties_go_to_the_lowest_index():
    assert gpus.rank_gpus({2: 4, 0: 4, 1: 4}) == [0, 1, 2]


def test_no_nvml_means_no_pinning(monkeypatch):
    assert gpus.choose_gpu(0, nvml=FakeNVML([1], fail_init=True)) is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    assert gpus.free_memory() is None
    assert gpus.choose_gpu(0) is None


def test_pin_sets_the_visible_device_in_pci_order():
    env: dict[str, str] = {}
    gpus.pin(3, env)
    assert env == {"CUDA_VISIBLE_DEVICES": "3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


@pytest.mark.parametrize("text, want", [("0,1", [0, 1]), (" 2 , 0 ", [2, 0]), ("1,1", [1])])
def test_parse_gpu_list(text, want):
    assert gpus.parse_gpu_list(text) == want


@pytest.mark.parametrize("text", ["", "a", "0,-1", "0;1", "GPU-1234"])
def test_parse_gpu_list_rejects(text):
    with pytest.raises(HarnessError, match="GPU list"):
        gpus.parse_gpu_list(text)


@pytest.mark.parametrize("value, want", [(None, None), ("", []), ("1,3", [1, 3]),
                                         ("GPU-8e1b", None)])
def test_visible_candidates(value, want):
    env = {} if value is None else {"CUDA_VISIBLE_DEVICES": value}
    assert gpus.visible_candidates(env) == want
