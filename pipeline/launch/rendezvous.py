"""A rendezvous with a deadline that says who is missing, for `deberta-ds launch check`.

torch's env:// rendezvous waits silently: a rank that was never started, or a rank 0 that is not there, keeps
the others waiting for the whole process-group timeout and then fails without naming anyone. Here rank 0
serves a TCPStore at MASTER_ADDR:MASTER_PORT, every rank writes its arrival (with its host) into it, and rank 0
waits for them until the deadline, then tells every rank the verdict through the store: all arrived (the
process group is built on this same store), or the ranks that did not arrive, which every rank present
reports in one line. A rank that cannot reach rank 0 within the deadline says so, naming the address.
"""
import datetime
import json
import socket
import time

from pipeline.errors import LaunchError

PREFIX = "deberta-ds/launch-check"


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def port_open(addr, port, deadline):
    """Whether addr:port accepts a connection before `deadline` (monotonic seconds). Probed here because torch's
    client logs every failed try with a C++ stack trace."""
    while True:
        try:
            with socket.create_connection((addr, port), timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def open_store(env, timeout_s, deadline):
    """Rank 0 serves the store, the others connect to it once rank 0 listens (until `deadline`)."""
    import torch.distributed as dist
    if env.rank != 0 and not port_open(env.master_addr, env.master_port, deadline):
        raise LaunchError(f"rank {env.rank} could not reach rank 0's rendezvous at {env.master_addr}:{env.master_port} "
                          f"within {timeout_s:g} s: is rank 0 running, and do MASTER_ADDR/MASTER_PORT name its host "
                          "and port?")
    try:
        return dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=env.rank == 0,
                             timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    except Exception as error:  # noqa: BLE001 (torch raises DistNetworkError, RuntimeError or TimeoutError)
        if env.rank == 0:
            raise LaunchError(f"rank 0 cannot serve the rendezvous on {env.master_addr}:{env.master_port} "
                              f"(MASTER_ADDR/MASTER_PORT: {_first_line(error)})") from None
        raise LaunchError(f"rank {env.rank} could not join rank 0's rendezvous at {env.master_addr}:{env.master_port} "
                          f"({_first_line(error)})") from None


def wait_for_ranks(store, world_size, deadline):
    """The ranks whose arrival is not in the store by `deadline` (monotonic seconds)."""
    missing = list(range(world_size))
    while missing:
        missing = [r for r in missing if not store.check([f"{PREFIX}/arrived/{r}"])]
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return missing


def rendezvous(env, timeout_s):
    """A store every rank has reached within timeout_s, or a LaunchError naming the ranks that did not arrive."""
    deadline = time.monotonic() + timeout_s
    store = open_store(env, timeout_s, deadline)
    store.set(f"{PREFIX}/arrived/{env.rank}", socket.gethostname())
    if env.rank == 0:
        missing = wait_for_ranks(store, env.world_size, deadline)
        store.set(f"{PREFIX}/verdict", json.dumps(missing))
        if missing:  # the ranks present read the verdict before rank 0 (the store's server) exits
            wait_for_ranks_to_read(store, [r for r in range(env.world_size) if r not in missing])
    else:
        try:
            store.wait([f"{PREFIX}/verdict"], datetime.timedelta(seconds=timeout_s + 10))
            missing = json.loads(store.get(f"{PREFIX}/verdict"))
            store.set(f"{PREFIX}/read/{env.rank}", "1")
        except Exception as error:  # noqa: BLE001 (rank 0 gone, or no verdict in time)
            raise LaunchError(f"rank {env.rank}: rank 0 at {env.master_addr}:{env.master_port} gave no verdict on "
                              f"the rendezvous ({_first_line(error)})") from None
    if missing:
        raise LaunchError(f"rank(s) {', '.join(map(str, missing))} of {env.world_size} did not reach the rendezvous at "
                          f"{env.master_addr}:{env.master_port} within {timeout_s:g} s: check that every rank was "
                          "started and that all see the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT (--timeout to "
                          "wait longer)")
    return store


def wait_for_ranks_to_read(store, ranks, grace_s=2.0):
    """Give the ranks present up to grace_s to read the verdict (so each of them reports it, too)."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not all(store.check([f"{PREFIX}/read/{r}"]) for r in ranks if r != 0):
        time.sleep(0.05)
