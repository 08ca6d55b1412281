"""The reusable action (action.yml) and the workflows that use it: what actionlint (in
.ci/run) does not check of a composite action's metadata."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ACTION = yaml.safe_load((ROOT / "action.yml").read_text())
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
_INPUT_REF = re.compile(r"inputs\.([A-Za-z0-9_-]+)")


def test_action_is_composite_and_every_input_it_reads_is_declared():
    assert ACTION["runs"]["using"] == "composite"
    declared = set(ACTION["inputs"])
    assert {"target", "time", "corpus", "python-version"} <= declared
    used = set(_INPUT_REF.findall((ROOT / "action.yml").read_text().split("runs:", 1)[1]))
    assert used <= declared, used - declared
    for name, spec in ACTION["inputs"].items():
        assert spec.get("description"), name


def test_action_steps_have_a_shell_and_never_splice_inputs_into_scripts():
    """A composite `run` step needs `shell`; `${{ inputs.x }}` inside a script is a shell
    injection (a target spec is user text): inputs reach scripts through `env`."""
    for step in ACTION["runs"]["steps"]:
        if "run" in step:
            assert step.get("shell") == "bash", step
            assert "${{" not in step["run"], step["run"]


def test_action_runs_the_gate_uploads_sarif_and_fails_with_it():
    text = (ROOT / "action.yml").read_text()
    assert "moe-harness gate" in text and "--sarif" in text and "--junit" in text
    uses = [s.get("uses", "") for s in ACTION["runs"]["steps"]]
    assert any(u.startswith("github/codeql-action/upload-sarif@") for u in uses)
    assert any(u.startswith("actions/upload-artifact@") for u in uses)
    assert 'exit "${CODE:-2}"' in ACTION["runs"]["steps"][-1]["run"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflows_use_the_action_with_declared_inputs_only(path):
    wf = yaml.safe_load(path.read_text())
    for job in wf["jobs"].values():
        for step in job.get("steps", []):
            if step.get("uses") == "./":
                assert set(step.get("with", {})) <= set(ACTION["inputs"]), step


def test_the_three_workflows_do_what_the_project_promises():
    ci, gpu, nightly = (yaml.safe_load((ROOT / ".github" / "workflows" / f"{n}.yml")
                                       .read_text()) for n in ("ci", "gpu", "nightly"))
    gate = next(s for s in ci["jobs"]["gate"]["steps"] if s.get("uses") == "./")
    assert gate["with"]["time"] == "120" and gate["with"]["target"] == "cpu"
    assert "bash .ci/run" in ci["jobs"]["cpu"]["steps"][-1]["run"]
    steps = gpu["jobs"]["gpu"]["steps"]
    assert gpu["jobs"]["gpu"]["runs-on"] == ["self-hosted", "gpu"]
    assert any("-m gpu" in s.get("run", "") for s in steps)
    assert any("--sanitizer memcheck" in s.get("run", "") for s in steps)
    assert any(s.get("with", {}).get("time") == "600" for s in steps if s.get("uses") == "./")
    # yaml reads the key `on` as True
    assert "schedule" in nightly[True]
    text = (ROOT / ".github" / "workflows" / "nightly.yml").read_text()
    for needed in ("actions/cache/restore@", "actions/cache/save@", "corpus merge",
                   "moe-harness report", "actions/upload-artifact@"):
        assert needed in text
