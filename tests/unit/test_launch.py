"""pipeline/launch/env.py: which launcher's variables win, and what each one yields.

Pure functions over a dict of variables: each test states the environment a launcher really
creates (see slurm/smoke.sbatch for the real Slurm run, tests/integration/test_slurm_smoke.py).
"""
import os
import socket

import pytest

from pipeline import cli
from pipeline.launch import env as launch
from pipeline.launch import hostfile
from pipeline.errors import LaunchError
from pipeline.launch.env import DistEnv, discover_env


def test_single_process_defaults_to_rank0_on_a_free_port():
    env = discover_env({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == (0, 1, 0, 1, 0)
    assert env.master_addr == "127.0.0.1" and env.source == "single"
    # The port is free: we can listen on it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", env.master_port))


def test_single_process_keeps_given_master():
    env = discover_env({"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "4242"})
    assert (env.master_addr, env.master_port, env.source) == ("10.0.0.5", 4242, "single")


def test_torchrun_variables():
    environ = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
               "MASTER_ADDR": "n01", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "abc"}
    assert discover_env(environ) == DistEnv(5, 8, 1, 4, 1, "n01", 29400, "torchrun")


def test_deepspeed_launcher_variables():
    # What deepspeed/launcher/launch.py exports (plus --local_rank on argv, the caller's business).
    environ = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
               "CROSS_SIZE": "2", "MASTER_ADDR": "gpu1", "MASTER_PORT": "29500"}
    assert discover_env(environ) == DistEnv(3, 4, 1, 2, 1, "gpu1", 29500, "deepspeed")


def test_plain_rank_variables_assume_one_host_and_torch_default_port():
    env = discover_env({"RANK": "1", "WORLD_SIZE": "2"})
    assert env == DistEnv(1, 2, 0, 2, 0, "127.0.0.1", 29500, "env")


def test_explicit_rank_wins_over_slurm_step():
    # torchrun started by srun: its workers carry both; torchrun's numbering is the real one.
    environ = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "node1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x",
               "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}
    env = discover_env(environ)
    assert (env.rank, env.world_size, env.source) == (3, 4, "torchrun")


def slurm_step(**extra):
    """The variables srun gives task 1 of `sbatch -N2 --ntasks-per-node=2` (4 tasks), job 1234."""
    environ = {
        "SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_TASKS_PER_NODE": "2(x2)",
    }
    environ.update(extra)
    return environ


def test_slurm_step(monkeypatch):
    # No scontrol in a unit test: the built-in hostlist parser finds rank 0's host.
    monkeypatch.setenv("PATH", "/nonexistent")
    env = discover_env(slurm_step())
    assert env == DistEnv(3, 4, 1, 2, 1, "gpu07", launch.SLURM_PORT_BASE + 1234, "slurm")


def test_slurm_uses_scontrol_for_master_addr(monkeypatch):
    calls = []
    monkeypatch.setattr(launch, "slurm_hostnames", lambda hl: calls.append(hl) or ["gpu07", "gpu08"])
    assert discover_env(slurm_step()).master_addr == "gpu07"
    assert calls == ["gpu[07-08]"]


def test_slurm_master_variables_win():
    env = discover_env(slurm_step(MASTER_ADDR="head", MASTER_PORT="31000"))
    assert (env.master_addr, env.master_port) == ("head", 31000)


def test_slurm_port_depends_on_job_id_only():
    # every rank of one job must derive the same port; another job gets another one
    a = discover_env(slurm_step(MASTER_ADDR="h"))
    b = discover_env(slurm_step(MASTER_ADDR="h", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0"))
    c = discover_env(slurm_step(MASTER_ADDR="h", SLURM_JOB_ID="1235"))
    assert a.master_port == b.master_port != c.master_port
    assert 1024 < a.master_port < 32768


@pytest.mark.parametrize("variable,value,expected", [
    ("SLURM_STEP_TASKS_PER_NODE", "1,3", 3),   # this is node 1: its count is the second one
    ("SLURM_NTASKS_PER_NODE", "2", 2),
    ("SLURM_TASKS_PER_NODE", "1,3", 3),
])
def test_slurm_local_world_size_sources(variable, value, expected):
    environ = slurm_step(MASTER_ADDR="h", SLURM_TASKS_PER_NODE="")
    environ[variable] = value
    assert discover_env(environ).local_world_size == expected


def test_slurm_step_layout_wins_over_the_job_layout():
    # `srun --ntasks-per-node=1` inside a job of 2 tasks per node
    environ = slurm_step(MASTER_ADDR="h", SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="0",
                         SLURM_STEP_TASKS_PER_NODE="1(x2)")
    assert discover_env(environ).local_world_size == 1


def test_batch_shell_is_not_a_rank():
    # sbatch's batch shell: SLURM_PROCID=0 and SLURM_NTASKS=2 but no step: it runs the launcher.
    environ = slurm_step(SLURM_PROCID="0", SLURM_NTASKS="2")
    del environ["SLURM_STEP_ID"]
    env = discover_env(environ)
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")


def test_openmpi_single_host():
    environ = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
               "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_PORT": "29600"}
    assert discover_env(environ) == DistEnv(1, 2, 1, 2, 0, "127.0.0.1", 29600, "openmpi")


def test_openmpi_wins_over_slurm_daemon_step(monkeypatch):
    # mpirun in a 2-node allocation: its orted daemons run as a 2-task srun step, so rank 3 of 4
    # carries SLURM_PROCID=1, SLURM_NTASKS=2. Rank 0 is on the allocation's first node.
    monkeypatch.setenv("PATH", "/nonexistent")
    environ = slurm_step(SLURM_PROCID="1", SLURM_NTASKS="2", OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_SIZE="4",
                         OMPI_COMM_WORLD_LOCAL_RANK="1", OMPI_COMM_WORLD_LOCAL_SIZE="2")
    env = discover_env(environ)
    assert (env.rank, env.world_size, env.local_rank, env.node_rank, env.master_addr, env.source) == \
        (3, 4, 1, 1, "gpu07", "openmpi")


def test_openmpi_multi_host_without_master_addr_is_an_error():
    environ = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
               "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        discover_env(environ)


def test_pmi_hydra():
    environ = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2",
               "MASTER_ADDR": "h0", "MASTER_PORT": "29501"}
    assert discover_env(environ) == DistEnv(2, 4, 0, 2, 1, "h0", 29501, "pmi")


def test_pmi_without_local_variables_is_one_host():
    env = discover_env({"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_PORT": "29502"})
    assert env == DistEnv(1, 2, 1, 2, 0, "127.0.0.1", 29502, "pmi")


def test_srun_pmi2_prefers_the_slurm_variables():
    # srun --mpi=pmi2 sets PMI_RANK/PMI_SIZE equal to Slurm's: Slurm's also give the local layout.
    env = discover_env(slurm_step(MASTER_ADDR="h", PMI_RANK="3", PMI_SIZE="4"))
    assert (env.source, env.local_rank, env.local_world_size) == ("slurm", 1, 2)


def test_inconsistent_variables_are_an_error():
    with pytest.raises(LaunchError, match="inconsistent"):
        discover_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(LaunchError, match="not an integer"):
        discover_env({"RANK": "x", "WORLD_SIZE": "4"})


def test_export_env_writes_what_torch_and_deepspeed_read():
    environ = {"RANK": "stale"}
    launch.export_env(DistEnv(1, 2, 1, 2, 0, "node1", 20001, "slurm"), environ)
    assert environ == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "node1", "MASTER_PORT": "20001"}
    # and discovery reads it back unchanged (a child process of ours sees the same position)
    assert discover_env(environ) == DistEnv(1, 2, 1, 2, 0, "node1", 20001, "env")


def test_runtime_defaults_only_fill_gaps():
    env = DistEnv(0, 2, 0, 2, 0, "127.0.0.1", 1, "slurm")
    environ = {"SLURM_CPUS_PER_TASK": "3"}
    assert launch.apply_runtime_defaults(env, environ) == {"OMP_NUM_THREADS": "3",
                                                           "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
                                                           "TORCH_EXTENSIONS_DIR": launch.extensions_cache()}
    environ = {"OMP_NUM_THREADS": "7", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0", "TORCH_EXTENSIONS_DIR": "/ops"}
    assert launch.apply_runtime_defaults(env, environ) == {}
    assert environ["OMP_NUM_THREADS"] == "7"
    # the deepspeed launcher as one Slurm task per node (--cpus-per-task=8) with 4 ranks: 2 threads each
    environ = {"SLURM_CPUS_PER_TASK": "8"}
    launch.apply_runtime_defaults(DistEnv(1, 8, 1, 4, 0, "node1", 1, "deepspeed"), environ)
    assert environ["OMP_NUM_THREADS"] == "2"
    # without Slurm: the usable CPUs split between the ranks of this node, at least 1
    environ = {}
    launch.apply_runtime_defaults(DistEnv(0, 64, 0, 64, 0, "h", 1, "env"), environ)
    assert environ["OMP_NUM_THREADS"] == str(max(len(os.sched_getaffinity(0)) // 64, 1))


@pytest.mark.parametrize("hostlist,first", [
    ("node1", "node1"), ("node[1-2]", "node1"), ("gpu[07-09,12],cpu1", "gpu07"),
    ("rack[2-3]-n[010-011]", "rack2-n010"), ("a,b[1-3]", "a"), ("x[5,1-3]", "x5"),
])
def test_first_host_fallback(hostlist, first):
    assert launch.first_host_fallback(hostlist) == first


def test_parse_tasks_per_node():
    assert launch.parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert launch.parse_tasks_per_node("4") == [4]
    with pytest.raises(LaunchError):
        launch.parse_tasks_per_node("2(x)")


def test_hostfile_slots_sources():
    hosts = ["a", "b"]
    assert hostfile.hostfile_slots(hosts, {"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"}) == [8, 8]
    assert hostfile.hostfile_slots(hosts, {"SLURM_GPUS_ON_NODE": "0", "SLURM_NTASKS_PER_NODE": "2"}) == [2, 2]
    assert hostfile.hostfile_slots(hosts, {"SLURM_TASKS_PER_NODE": "3,1"}) == [3, 1]
    assert hostfile.hostfile_slots(hosts, {}) == [1, 1]
    assert hostfile.hostfile_slots(hosts, {"SLURM_GPUS_ON_NODE": "8"}, slots=4) == [4, 4]


def test_hostfile_outside_allocation_fails_clearly(tmp_path, capsys, monkeypatch):
    for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["hostfile", "--output", str(tmp_path / "hostfile")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: not inside a Slurm allocation") and len(err.splitlines()) == 1
    assert not (tmp_path / "hostfile").exists()


def test_write_hostfile_is_atomic_and_complete(tmp_path):
    path = tmp_path / "sub" / "hostfile"
    hostfile.write_hostfile(str(path), ["node1", "node2"], [2, 1])
    assert path.read_text() == "node1 slots=2\nnode2 slots=1\n"
    assert os.listdir(path.parent) == ["hostfile"]  # no temp file left behind


def test_each_python_environment_gets_its_own_op_cache_where_none_is_set(tmp_path):
    one, other = launch.extensions_cache(str(tmp_path / "venv-a")), launch.extensions_cache(str(tmp_path / "venv-b"))
    assert one != other and one == launch.extensions_cache(str(tmp_path / "venv-a"))
    assert os.path.basename(one).startswith("deberta-ds-venv-a-")
    env = DistEnv(0, 1, 0, 1, 0, "127.0.0.1", 29500, "single")
    environ = {}
    assert launch.apply_runtime_defaults(env, environ)["TORCH_EXTENSIONS_DIR"] == launch.extensions_cache()
    kept = {"TORCH_EXTENSIONS_DIR": "/shared/ops"}
    launch.apply_runtime_defaults(env, kept)
    assert kept["TORCH_EXTENSIONS_DIR"] == "/shared/ops"


# ---------------------------------------------------------------- bad variables: one line naming the variable
@pytest.mark.parametrize("environ", [{"MASTER_PORT": "99999"}, {"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "0"},
                                     slurm_step(MASTER_ADDR="h", MASTER_PORT="-1")])
def test_a_master_port_outside_the_tcp_range_is_refused_naming_it(environ):
    with pytest.raises(LaunchError, match=rf"^MASTER_PORT='{environ['MASTER_PORT']}' is not a TCP port: give one in 1-65535"):
        discover_env(environ)


def test_launch_env_with_a_bad_master_port_is_one_line(monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_PORT", "99999")
    assert cli.main(["launch", "env"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: MASTER_PORT='99999' is not a TCP port: give one in 1-65535 (unprivileged, and free on rank 0's host: "
        "1024-65535)"]


@pytest.mark.parametrize("hostlist, why", [
    ("node[1-2", "a '[' without its ']'"), ("node]", "a ']' without its '['"), ("n[1-[2]]", "a '[' inside brackets"),
    ("node[2-1]", "the range 2-1 runs backwards"), ("node[a-b]", "'node[a-b]' is not a host name with [ranges]"),
    ("node 1", "'node 1' is not a host name with [ranges]"), (",", "no host"),
])
def test_a_malformed_hostlist_is_refused_naming_the_variable_and_the_value(hostlist, why):
    with pytest.raises(LaunchError) as error:
        launch.check_hostlist(hostlist, "SLURM_JOB_NODELIST")
    assert str(error.value) == f"SLURM_JOB_NODELIST={hostlist!r} is not a Slurm hostlist: {why} (e.g. 'node[01-04],gpu7')"


@pytest.mark.parametrize("hostlist", ["node1", "node[1-2]", "gpu[07-09,12],cpu1", "rack[2-3]-n[010-011]", "a,b[1-3]",
                                      "x[5,1-3]", "n-1.cluster_a"])
def test_real_hostlists_pass_the_check(hostlist):
    launch.check_hostlist(hostlist, "SLURM_JOB_NODELIST")


def test_a_slurm_step_with_a_malformed_node_list_names_the_variable(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # the built-in parser took `node]` for a host before
    with pytest.raises(LaunchError, match=r"^SLURM_STEP_NODELIST='node\]' is not a Slurm hostlist"):
        discover_env(slurm_step(SLURM_STEP_NODELIST="node]"))
    with pytest.raises(LaunchError, match=r"^SLURM_TASKS_PER_NODE='2\(x\)' is not a Slurm task count list"):
        discover_env(slurm_step(MASTER_ADDR="h", SLURM_TASKS_PER_NODE="2(x)"))
    with pytest.raises(LaunchError, match=r"^SLURM_PROCID='abc' is not an integer"):
        discover_env(slurm_step(SLURM_PROCID="abc"))


@pytest.mark.parametrize("nodelist", ["node[1-2", "node]"])
def test_hostfile_with_a_malformed_nodelist_is_refused_and_writes_nothing(nodelist, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_NODELIST", nodelist)
    assert cli.main(["hostfile", "--output", str(tmp_path / "hostfile")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: SLURM_JOB_NODELIST={nodelist!r} is not a Slurm hostlist: ") and \
        len(err.splitlines()) == 1, err
    assert os.listdir(tmp_path) == []


def test_preprocess_with_a_slurm_array_variable_that_is_no_integer_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "abc")
    argv = ["preprocess", "--tokenizer", str(tmp_path / "spm.model"), "--output-dir", str(tmp_path / "shards"),
            "--input", str(tmp_path / "none.txt")]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.splitlines() == ["error: SLURM_ARRAY_TASK_ID='abc' is not an integer"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN gives task 3, which is not in [0, 2) (SLURM_ARRAY_TASK_COUNT 2)"]


def test_an_unresolvable_master_addr_is_named_before_any_rendezvous():
    with pytest.raises(LaunchError, match=r"^MASTER_ADDR='no-such-host.invalid' does not resolve \("):
        launch.check_master_addr(DistEnv(1, 2, 0, 1, 1, "no-such-host.invalid", 29500, "env"))
    launch.check_master_addr(DistEnv(0, 1, 0, 1, 0, "127.0.0.1", 29500, "single"))


# ---------------------------------------------------------------- launch check: a rendezvous with a deadline
def launch_check(rank, world, port, timeout="1.5", addr="127.0.0.1"):
    """`deberta-ds launch check` as rank `rank` of `world`, started in the background."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=addr, MASTER_PORT=str(port),
                   PYTHONPATH=root, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "launch", "check", "--timeout", timeout], cwd=root,
                            env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process, limit=60):
    out, err = process.communicate(timeout=limit)
    return process.returncode, out, err


def test_launch_check_names_the_ranks_that_did_not_arrive_within_its_timeout():
    # a 3-rank job of which rank 2 was never started: ranks 0 and 1 both end in one line naming it
    port = launch.free_port()
    ranks = [launch_check(0, 3, port), launch_check(1, 3, port)]
    for process in ranks:
        code, out, err = finished(process)
        assert code == 1 and out == "" and err.splitlines() == [
            f"error: rank(s) 2 of 3 did not reach the rendezvous at 127.0.0.1:{port} within 1.5 s: check that every "
            "rank was started and that all see the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT (--timeout to wait "
            "longer)"], err


def test_launch_check_without_rank_0_or_with_an_unknown_master_ends_in_one_line():
    port = launch.free_port()
    code, _, err = finished(launch_check(1, 2, port))
    assert code == 1 and err.splitlines() == [
        f"error: rank 1 could not reach rank 0's rendezvous at 127.0.0.1:{port} within 1.5 s: is rank 0 running, and "
        "do MASTER_ADDR/MASTER_PORT name its host and port?"], err
    code, _, err = finished(launch_check(1, 2, port, addr="no-such-host.invalid"))
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith(
        "error: MASTER_ADDR='no-such-host.invalid' does not resolve ("), err


def test_launch_check_passes_when_every_rank_arrives():
    port = launch.free_port()
    ranks = [launch_check(r, 2, port, timeout="60") for r in (1, 0)]  # the order of starting does not matter
    for process in ranks:
        code, out, err = finished(process, limit=120)
        assert code == 0 and "LAUNCH_CHECK" in out and "world_size=2" in out and "rank_sum=1" in out, err


@pytest.mark.parametrize("argv", [["pretrain", "--config", "tiny_cpu", "--deepspeed", "cpu_zero3_fp32"],
                                  ["finetune", "--task", "CB", "--release", "nowhere"]])
def test_a_trainer_with_an_unresolvable_master_addr_stops_in_one_line_before_its_output_directory(argv, tmp_path, capsys,
                                                                                                 monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "no-such-host.invalid")
    assert cli.main(argv + ["--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: MASTER_ADDR='no-such-host.invalid' does not resolve (") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
