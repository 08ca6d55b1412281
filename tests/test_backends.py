"""One resolver: a target spec becomes a `Target` in `harness.backends` alone."""

from __future__ import annotations

import pytest

from harness.backends import _ISOLATE, BACKENDS, _builtin_class, resolve_target, target_traits
from harness.backends.cpu import CpuTarget
from harness.errors import BackendUnavailable, ConfigError


def test_targets_by_name_and_by_module_attr():
    assert resolve_target("cpu").name == "cpu"
    assert isinstance(resolve_target("harness.backends.cpu:CpuTarget"), CpuTarget)
    assert target_traits("harness.backends.cpu:CpuTarget") == ("cpu", False)
    assert target_traits("cuda") == ("cuda", True) and target_traits("cpu") == ("cpu", False)


def test_traits_of_bundled_backends_are_their_classes():
    for name in BACKENDS:
        cls = _builtin_class(name, graph=False)
        assert (cls.name, cls.isolate) == (name, _ISOLATE[name])


class _Isolated(CpuTarget):
    name = "mine"
    isolate = True


def make_isolated() -> CpuTarget:
    return _Isolated()


@pytest.mark.parametrize("attr", ["_Isolated", "make_isolated"])
def test_a_user_target_declares_isolation_by_class_or_factory(attr):
    assert target_traits(f"tests.test_backends:{attr}") == ("mine", True)
    assert resolve_target(f"tests.test_backends:{attr}").isolate


@pytest.mark.parametrize("spec, message", [
    ("tpu", "unknown backend .tpu.: expected cpu, cuda or module:attr"),
    ("no_such_module:T", "cannot import"),
    ("harness.corpus.expect:NoSuchThing", "has no attribute"),
    ("harness.corpus.explain:INDEX_KEYS", "not a"),
])
def test_bad_targets_are_named(spec, message):
    with pytest.raises(BackendUnavailable, match=message):
        resolve_target(spec)


def test_graph_mode_needs_the_cuda_backend():
    for spec in ("cpu", "harness.backends.cpu:CpuTarget"):
        with pytest.raises(ConfigError, match="needs the cuda backend"):
            resolve_target(spec, graph=True)
