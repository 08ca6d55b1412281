"""Calls in a child process (harness/isolation.py): results, crashes, hangs, errors, restarts."""

from __future__ import annotations

import time

import pytest

from harness.errors import IsolationError
from harness.isolation import Isolated, describe_exit

CHILD_FUNCTIONS = """
import os
import sys
import time


def echo(value):
    print("noise on stdout that must not corrupt the reply")
    return {"value": value, "pid": os.getpid()}


def crash(code):
    print("last words", file=sys.stderr, flush=True)
    os._exit(code)


def hang():
    time.sleep(600)


def boom():
    raise ValueError("a bad value")


def restart():
    from harness import isolation

    isolation.request_restart()
    return os.getpid()
"""


@pytest.fixture
def iso(tmp_path, monkeypatch):
    (tmp_path / "childfns.py").write_text(CHILD_FUNCTIONS)
    monkeypatch.syspath_prepend(str(tmp_path))  # the child gets our sys.path
    with Isolated() as runner:
        yield runner


def test_a_call_returns_its_json_value(iso):
    first = iso.call("childfns:echo", {"value": [1, "two", None]})
    assert first["value"] == [1, "two", None]
    assert iso.call("childfns:echo", {"value": 3})["pid"] == first["pid"]  # one child
    assert iso.starts == 1


def test_a_crash_fails_that_call_and_the_next_gets_a_fresh_child(iso):
    pid = iso.call("childfns:echo", {"value": 0})["pid"]
    with pytest.raises(IsolationError) as info:
        iso.call("childfns:crash", {"code": 3})
    assert info.value.kind == "crash"
    assert "died (exit code 3)" in str(info.value)
    assert "last words" in info.value.output
    assert iso.call("childfns:echo", {"value": 1})["pid"] != pid
    assert iso.starts == 2


def test_a_hang_is_cut_by_the_time_out(iso):
    start = time.monotonic()
    with pytest.raises(IsolationError) as info:
        iso.call("childfns:hang", {}, timeout=0.5)
    assert info.value.kind == "timeout"
    assert "did not return within 0.5 s" in str(info.value)
    assert time.monotonic() - start < 10
    assert iso.call("childfns:echo", {"value": 2})["value"] == 2


def test_an_exception_is_an_error_and_the_child_lives_on(iso):
    with pytest.raises(IsolationError, match="ValueError: a bad value") as info:
        iso.call("childfns:boom", {})
    assert info.value.kind == "error"
    assert "Traceback" in info.value.output
    iso.call("childfns:echo", {"value": 3})
    assert iso.starts == 1


def test_a_call_may_ask_for_a_fresh_child(iso):
    pid = iso.call("childfns:restart", {})
    assert iso.call("childfns:echo", {"value": 4})["pid"] != pid


def test_setup_calls_run_in_every_new_child(tmp_path, monkeypatch):
    (tmp_path / "childfns.py").write_text(CHILD_FUNCTIONS)
    monkeypatch.syspath_prepend(str(tmp_path))
    with Isolated(setup=[("childfns:boom", {})]) as runner, \
            pytest.raises(IsolationError, match="setting up a new child: ValueError"):
        runner.call("childfns:echo", {"value": 5})


@pytest.mark.parametrize("code, text", [(3, "exit code 3"), (-11, "killed by signal SIGSEGV"),
                                        (-9, "killed by signal SIGKILL")])
def test_describe_exit(code, text):
    assert describe_exit(code) == text
