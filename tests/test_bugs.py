from __future__ import annotations

import pytest

from harness.bugs import VARIANTS, BugSet
from harness.errors import UnknownVariant

NAMES = ["topk-nan-argmax", "a2a-unsanitized-padding", "sort-duplicate-break", "grid-y-overflow",
         "lora-grid-off-by-one", "lora-id-unchecked", "lora-disabled-adapter"]


def test_registry_names_are_the_contract():
    assert list(VARIANTS) == NAMES  # order = the CUDA bitmask bits
    for v in VARIANTS.values():
        assert v.stage and v.origin and v.description and v.signatures


def test_bugset():
    bugs = BugSet.of(["grid-y-overflow", "topk-nan-argmax"])
    assert bugs.on("grid-y-overflow") and not bugs.on("sort-duplicate-break")
    assert str(bugs) == "grid-y-overflow,topk-nan-argmax" and str(BugSet()) == "fixed"
    with pytest.raises(UnknownVariant, match="nope"):
        BugSet.of(["nope"])
    with pytest.raises(UnknownVariant):
        bugs.on("typo")
