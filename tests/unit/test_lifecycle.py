"""One run per directory (pipeline/run/lifecycle.py RunLock) and the fault-injection hook."""
import json
import os
import socket
import subprocess
import sys

import pytest

from pipeline.errors import RunLockedError
from pipeline.run.lifecycle import LOCK_FILE, RunLock, fault_points


@pytest.fixture(autouse=True)
def no_slurm_job(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def holder(tmp_path, **values):
    record = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": None, "slurm_job_id": None,
              "started": "2026-12-01T10:00:00", "command": "deberta-ds pretrain"}
    record.update(values)
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))


def dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_lock_is_taken_released_and_refused_while_held(tmp_path):
    lock, message = RunLock.acquire(str(tmp_path))
    assert message is None and json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(RunLockedError) as error:
        RunLock.acquire(str(tmp_path), "pretraining run")
    text = str(error.value)
    assert f"in use by another pretraining run (host {socket.gethostname()}, pid {os.getpid()}" in text
    assert f"delete {tmp_path / LOCK_FILE}" in text
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_lock_of_a_process_that_is_gone_is_taken_over(tmp_path):
    holder(tmp_path, pid=dead_pid())
    lock, message = RunLock.acquire(str(tmp_path))
    assert "took over the lock of a run that is gone" in message and "its process has ended" in message
    lock.release()


def test_a_reused_pid_is_told_from_the_holder_by_its_start_time(tmp_path):
    holder(tmp_path, pid=os.getpid(), process_start=1)     # this pid, but started at another time
    lock, message = RunLock.acquire(str(tmp_path))
    assert "the pid is now another process's" in message
    lock.release()


def test_the_same_slurm_job_after_a_requeue_takes_over_and_another_host_is_refused(tmp_path, monkeypatch):
    holder(tmp_path, host="node-elsewhere", pid=12345, slurm_job_id="777")
    with pytest.raises(RunLockedError, match="host node-elsewhere, pid 12345, Slurm job 777"):
        RunLock.acquire(str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    lock, message = RunLock.acquire(str(tmp_path))
    assert "the same Slurm job, requeued" in message
    lock.release()


def test_fault_points_read_the_test_variable(monkeypatch):
    monkeypatch.setenv("DEBERTA_DS_FAULT", "signal:5,16")
    assert fault_points() == ("signal", {5, 16})
    monkeypatch.delenv("DEBERTA_DS_FAULT")
    assert fault_points() == (None, ())
