from __future__ import annotations

import itertools

import pytest

from harness import geometry as g
from harness.errors import LaunchConfigError


def test_validate_accepts_limits_and_rejects_beyond():
    ok = g.Launch("s", "k", (2**31 - 1, 65535, 65535), (1024, 1, 1))
    assert g.validate([ok]) == [ok]
    for grid in [(0, 1, 1), (1, 65536, 1), (1, 1, 65536), (2**31, 1, 1)]:
        with pytest.raises(LaunchConfigError):
            g.validate([g.Launch("s", "k", grid, (32, 1, 1))])
    with pytest.raises(LaunchConfigError):
        g.validate([g.Launch("s", "k", (1, 1, 1), (1024, 2, 1))])
    with pytest.raises(LaunchConfigError):
        g.validate([g.Launch("s", "k", (1, 1, 1), (32, 1, 1), shared_bytes=49 * 1024)])


def test_overflow_threshold_is_exact():
    for K, E, bs in [(22, 512, 128), (8, 128, 16), (1, 1, 1), (32, 1024, 64)]:
        t = g.overflow_num_tokens(K, E, bs)
        assert g.max_num_m_blocks(t, K, E, bs) > 65535
        if t > 1:
            assert g.max_num_m_blocks(t - 1, K, E, bs) <= 65535


def test_experts_chunks_cover_every_block_once():
    for n, K, E, bs in [(400_000, 22, 512, 128), (10, 2, 8, 16), (1, 1, 1, 1)]:
        total = g.max_num_m_blocks(n, K, E, bs)
        chunks = g.experts_chunks(n, K, E, bs)
        assert chunks[0][0] == 0 and chunks[-1][1] == total
        assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
        assert all(last - first <= 65535 for first, last in chunks)
        g.validate(g.experts_launches(n, K, E, bs, 8))


def test_unchunked_400k_launch_overflows_grid_y():
    with pytest.raises(LaunchConfigError, match=r"grid\.y"):
        g.validate(g.experts_launches(400_000, 22, 512, 128, 8, chunked=False))
    g.validate(g.experts_launches(400_000, 22, 512, 128, 8, chunked=True))


def test_paths():
    assert g.uses_warp_path(512) and g.uses_warp_path(192) and not g.uses_warp_path(60)
    assert g.warp_layout(8) == (8, 1) and g.warp_layout(576) == (32, 18)
    assert not g.sort_uses_three_step(256) and g.sort_uses_three_step(257)
    assert g.lora_launches(4, 8)[0].grid[0] == 5
    assert g.lora_launches(4, 8, off_by_one=True)[0].grid[0] == 4
