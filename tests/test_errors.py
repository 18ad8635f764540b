"""Error lines of a run of several processes."""

from __future__ import annotations

import os

import pytest

from dptune.errors import said_by_another_process


@pytest.fixture
def run_env(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    for k in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("DPTUNE_LAUNCHER_PID", "1234")
    return monkeypatch


def test_a_line_is_said_by_one_process_of_a_run_and_again_by_the_next_run(run_env, tmp_path):
    line = "error: data/x.png: not a readable mask"
    assert not said_by_another_process(line)  # the first process of the run says it
    run_env.setenv("LOCAL_RANK", "1")
    assert said_by_another_process(line)  # the second, the same line: said already
    assert not said_by_another_process("error: data/y.png: not a readable mask")  # another line is its own
    run_env.setenv("DPTUNE_LAUNCHER_PID", "5678")  # the user runs the same command again, same port
    assert not said_by_another_process(line)
    run_env.setenv("DPTUNE_LAUNCHER_PID", "1234")
    for m in tmp_path.glob("dptune-said-*"):
        os.utime(m, (0, 0))  # claims an hour old and more: an earlier run's, taken over and swept
    assert not said_by_another_process(line)
    assert not said_by_another_process("error: a third line")
    assert len(list(tmp_path.glob("dptune-said-*"))) == 2  # this run's two; the three old ones swept
    run_env.setenv("LOCAL_RANK", "1")
    assert said_by_another_process(line)  # the claim taken over holds again


def test_one_process_and_runs_without_a_run_key_always_say_it(run_env):
    line = "error: data/x.png: not a readable mask"
    run_env.delenv("LOCAL_RANK")
    assert not said_by_another_process(line) and not said_by_another_process(line)  # one process: every line
    run_env.setenv("LOCAL_RANK", "0")
    run_env.setenv("WORLD_SIZE", "1")  # torchrun of one process
    run_env.setenv("TORCHELASTIC_RUN_ID", "job-17")
    assert not said_by_another_process(line) and not said_by_another_process(line)
    run_env.delenv("DPTUNE_LAUNCHER_PID")
    run_env.setenv("WORLD_SIZE", "2")  # torchrun of two: the processes of one launch share its agent
    assert not said_by_another_process(line) and said_by_another_process(line)
    # the same command launched again (a static rendezvous: the same run id and port), by another agent
    run_env.setattr("os.getppid", lambda: 999999)
    assert not said_by_another_process(line) and said_by_another_process(line)
