"""Case editing (`harness.fuzz.resize`): the tensor fits and the two case resizers."""

from __future__ import annotations

import torch

from harness.case import MoECase, Overrides
from harness.fuzz.resize import LIMITS, cut, fit_flat, fit_rows, reshape, shrink, token_cap


def test_fit_rows_cuts_and_pads_with_the_fill():
    t = torch.arange(6, dtype=torch.int32).reshape(3, 2)
    assert fit_rows(t, 2, -1).tolist() == [[0, 1], [2, 3]]
    assert fit_rows(t, 4, -1).tolist() == [[0, 1], [2, 3], [4, 5], [-1, -1]]
    fill = torch.tensor([7, 8], dtype=torch.int32)
    assert fit_rows(t, 4, fill)[3].tolist() == [7, 8]


def test_fit_flat_and_cut():
    t = torch.arange(5.0)
    assert fit_flat(t, (2, 3), fill=-1).tolist() == [[0, 1, 2], [3, 4, -1]]
    assert fit_flat(t, (2,)).tolist() == [0, 1]
    m = torch.arange(12).reshape(3, 4)
    assert cut(m, 2, 3).tolist() == [[0, 1, 2], [4, 5, 6]] and cut(None, 1) is None
    assert cut(m, 1).data_ptr() != m.data_ptr()  # a copy, never a view


def test_reshape_keeps_size_dependent_fields_consistent():
    ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    case = MoECase(2, 4, 2, overrides=Overrides(topk_ids=ids))
    grown = reshape(case, T=5)
    assert grown.num_tokens == 5 and grown.overrides.topk_ids.shape == (5, 2)
    assert grown.overrides.topk_ids[:2].tolist() == ids.tolist()
    grown.validate()
    other_k = reshape(case, K=1)
    assert other_k.overrides.topk_ids is None  # its meaning changed with K: dropped
    huge = reshape(MoECase(2, 512, 8), T=10**9)
    assert huge.num_tokens == token_cap(512, 8, 1, LIMITS)


def test_shrink_cuts_explicit_tensors():
    logits = torch.arange(32.0).reshape(4, 8)
    case = MoECase(4, 8, 2, logits=logits)
    small = shrink(case, T=2, E=4)
    assert small.logits.tolist() == logits[:2, :4].tolist()
    small.validate()
