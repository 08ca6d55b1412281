"""Changed files -> the chain's stages (harness/changes.py), and `git diff` since a ref."""

from __future__ import annotations

import subprocess

import pytest

from harness.changes import STAGES, changed_files, changed_stages, stages_of
from harness.errors import ConfigError


@pytest.mark.parametrize("path, stages", [
    ("kernels/gating.cu", ("gating",)),
    ("kernels/a2a_sanitize.cu", ("dispatch",)),
    ("kernels/experts.cu", ("experts", "finalize")),
    ("kernels/lora_align.cu", ("lora_align",)),
    ("harness/chain/sort_align.py", ("sort_align",)),
    ("harness/invariants/layout.py", ("sort_align", "lora_align")),
    ("kernels/instrument.cuh", STAGES),  # shared by every kernel
    ("harness/oracle.py", STAGES),
    ("csrc/moe/my_topk_softmax.cu", ("gating",)),  # a user's file, by its stage words
    ("csrc/moe/moe_align_block_size.cu", ("sort_align",)),
    ("csrc/lora/lora_align_kernels.cu", ("lora_align",)),
    ("README.md", ()), ("corpus/seeds/abc.json", ()), (".github/workflows/ci.yml", ()),
    ("tests/test_gating.py", ()), ("harness/cli.py", ()),
])
def test_stages_of(path, stages):
    assert stages_of(path) == stages


def test_changed_stages_are_in_chain_order():
    assert changed_stages(["kernels/lora_align.cu", "README.md", "kernels/gating.cu"]) == (
        "gating", "lora_align")
    assert changed_stages(["docs/x.md"]) == ()


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_changed_files_since_the_merge_base_include_uncommitted_work(tmp_path):
    repo = tmp_path / "r"
    (repo / "kernels").mkdir(parents=True)
    (repo / "kernels" / "gating.cu").write_text("// v1\n")
    (repo / "README.md").write_text("v1\n")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    _git(repo, "checkout", "-qb", "pr")
    (repo / "kernels" / "gating.cu").write_text("// v2\n")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "change")
    (repo / "README.md").write_text("v2\n")  # not committed: still the pull request's
    assert sorted(changed_files("main", repo)) == ["README.md", "kernels/gating.cu"]
    assert changed_stages(changed_files("main", repo)) == ("gating",)
    with pytest.raises(ConfigError, match="--since"):
        changed_files("no-such-ref", repo)
    with pytest.raises(ConfigError, match="--since"):
        changed_files("main", tmp_path)  # not a repository
