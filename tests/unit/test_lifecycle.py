"""One run per directory (pipeline/run/lifecycle.py RunLock) and the fault-injection hook."""
import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline.run import lifecycle
from pipeline.errors import RunLockedError
from pipeline.run.lifecycle import LOCK_FILE, RunLock, fault_points

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def test_a_lock_whose_write_fails_is_not_left_behind(tmp_path):
    # a full disk when the run takes its lock (here: a file size limit of 16 bytes, as DEBERTA_DS_FAULT=fsize
    # does): the run is refused with one line naming the lock, and the next run is not locked out
    script = ("import resource, signal, sys\n"
              "from pipeline.run.lifecycle import RunLock\n"
              "from pipeline.errors import OutputError\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (16, resource.RLIM_INFINITY))\n"
              "try:\n    RunLock.acquire(sys.argv[1])\n"
              "except OutputError as error:\n    print(error)\n    sys.exit(7)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 7, done.stderr
    assert done.stdout.startswith(f"{tmp_path / LOCK_FILE}: cannot write the run lock (File too large)")
    assert os.listdir(tmp_path) == []  # no lock, no temporary
    lock, message = RunLock.acquire(str(tmp_path))
    assert message is None
    lock.release()


@pytest.mark.parametrize("content, found", [(b"", "the lock file is empty"), (b"{\"host\": \"n", "is not a lock record")])
def test_an_empty_or_damaged_lock_of_an_older_build_is_taken_over_with_a_message(tmp_path, monkeypatch, content, found):
    monkeypatch.setattr(lifecycle, "UNREADABLE_GRACE_S", 0.2)
    (tmp_path / LOCK_FILE).write_bytes(content)
    lock, message = RunLock.acquire(str(tmp_path), "pretraining run")
    assert message.startswith(f"{tmp_path}: took over the lock of a pretraining run that is gone (holder unknown: ")
    assert found in message
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_an_older_build_is_still_writing_is_read_again_not_taken_over(tmp_path, monkeypatch):
    # older builds created the lock empty, then wrote it: a live holder's lock may be empty for a moment
    monkeypatch.setattr(lifecycle, "UNREADABLE_GRACE_S", 5.0)
    (tmp_path / LOCK_FILE).write_bytes(b"")
    writer = threading.Timer(0.3, holder, args=(tmp_path,), kwargs={"pid": os.getppid()})
    writer.start()
    started = time.monotonic()
    with pytest.raises(RunLockedError, match=f"in use by another run \\(host {socket.gethostname()}, pid {os.getppid()}"):
        RunLock.acquire(str(tmp_path))
    writer.join()
    assert time.monotonic() - started < 5.0


def test_without_hard_links_the_lock_is_created_exclusively(tmp_path, monkeypatch):
    def no_link(*_):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_link)
    lock, _ = RunLock.acquire(str(tmp_path))
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == lock.identity
    assert os.listdir(tmp_path) == [LOCK_FILE]
    with pytest.raises(RunLockedError, match="in use by another run"):
        RunLock.acquire(str(tmp_path))
    lock.release()
    assert os.listdir(tmp_path) == []


def test_fault_points_read_the_test_variable(monkeypatch):
    monkeypatch.setenv("DEBERTA_DS_FAULT", "signal:5,16")
    assert fault_points() == ("signal", {5, 16})
    monkeypatch.delenv("DEBERTA_DS_FAULT")
    assert fault_points() == (None, ())
