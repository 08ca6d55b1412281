"""The fuzzing process' own pieces: the plug for atheris' leaking comparison hook."""

from __future__ import annotations

import weakref

import pytest
import torch

from harness.fuzz.child import plug_compare_leak

atheris = pytest.importorskip("atheris")


def _compare(a, b):
    return a == b


def _less(a, b):
    return a < b


def test_plugged_compare_hook_frees_every_result(monkeypatch):
    monkeypatch.setattr(atheris, "_trace_cmp", atheris._trace_cmp)  # restored afterwards
    compare = atheris.instrument_func(_compare)
    less = atheris.instrument_func(_less)
    a, b = torch.zeros(5), torch.arange(5.0)
    kept = weakref.ref(compare(a, b))
    if kept() is None:
        pytest.skip("this atheris does not leak comparison results")
    assert plug_compare_leak(atheris)
    assert not plug_compare_leak(atheris)  # the plugged hook no longer leaks: not wrapped twice
    for fn, expected in ((compare, a == b), (less, a < b)):
        result = fn(a, b)
        assert torch.equal(result, expected)
        ref = weakref.ref(result)
        del result
        assert ref() is None  # freed as soon as the caller drops it
    # plain values still compare (and are still traced by the native hook)
    assert compare(3, 3) is True and less(4, 3) is False and compare("ab", "ab") is True
    assert compare(b"x", b"y") is False and less(1.5, 2) is True
