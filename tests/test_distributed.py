"""esspr_jax.distributed: where multi-process settings come from, and a real 2-process start."""
import os
import pathlib
import sys
import textwrap

import pytest

from esspr_jax import distributed
from esspr_jax.distributed import DistributedSetupError, plan_initialization
from esspr_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
# 127.0.0.1 in /proc/net/tcp, and as IPv4-mapped / ::1 in /proc/net/tcp6
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}

SLURM_TWO_NODES_EIGHT_TASKS = {
    "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_NTASKS": "8",
    "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "2",
}


def plan(environ=None, on_tpu_vm=False, **kwargs):
  return plan_initialization(environ=environ or {}, on_tpu_vm=on_tpu_vm, **kwargs)


def test_nothing_set_is_a_single_process():
  assert plan().kind == "single"
  assert plan().jax_kwargs == {}


def test_explicit_settings_from_env_vars():
  p = plan({"ESSPR_COORDINATOR": "10.0.0.1:1234", "ESSPR_NUM_PROCESSES": "4",
            "ESSPR_PROCESS_ID": "3", "ESSPR_INIT_TIMEOUT_S": "30"})
  assert p.kind == "explicit"
  assert dict(p.jax_kwargs) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
      "cluster_detection_method": "deactivate", "initialization_timeout": 30}


def test_flags_win_over_env_vars():
  p = plan({"ESSPR_COORDINATOR": "10.0.0.1:1234", "ESSPR_NUM_PROCESSES": "4",
            "ESSPR_PROCESS_ID": "3"}, coordinator_address="host-a:99", process_id=0)
  assert p.jax_kwargs["coordinator_address"] == "host-a:99"
  assert p.jax_kwargs["process_id"] == 0
  assert p.jax_kwargs["num_processes"] == 4


def test_one_process_explicitly_is_a_no_op():
  assert plan(num_processes=1).kind == "single"


@pytest.mark.parametrize("given, missing", [
    ({"coordinator_address": "h:1"}, "ESSPR_NUM_PROCESSES"),
    ({"coordinator_address": "h:1", "num_processes": 2}, "ESSPR_PROCESS_ID"),
    ({"num_processes": 2, "process_id": 1}, "ESSPR_COORDINATOR"),
])
def test_half_given_settings_name_the_missing_one(given, missing):
  with pytest.raises(DistributedSetupError) as err:
    plan(**given)
  assert err.value.key == missing
  assert missing in str(err.value)
  assert isinstance(err.value, ConfigError)  # callers that catch ConfigError catch this


@pytest.mark.parametrize("kwargs, key, fragment", [
    ({"coordinator_address": "nohostport", "num_processes": 2, "process_id": 0},
     "--coordinator_address", "HOST:PORT"),
    ({"coordinator_address": "h:70000", "num_processes": 2, "process_id": 0},
     "--coordinator_address", "HOST:PORT"),
    ({"coordinator_address": "h:1", "num_processes": "two", "process_id": 0},
     "--num_processes", "integer"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2},
     "--process_id", "must be < --num_processes=2"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": -1},
     "--process_id", ">= 0"),
    ({"local_device_ids": "0,x"}, "--local_device_ids", "device ids"),
    ({"local_device_ids": "1,1"}, "--local_device_ids", "distinct"),
])
def test_malformed_settings_are_rejected_by_name(kwargs, key, fragment):
  with pytest.raises(DistributedSetupError) as err:
    plan(**kwargs)
  assert err.value.key == key
  assert fragment in str(err.value)


def test_local_device_ids_parse_and_all_means_unrestricted():
  base = {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}
  assert plan(local_device_ids="0, 2", **base).jax_kwargs["local_device_ids"] == [0, 2]
  assert plan(local_device_ids="all", **base).jax_kwargs["local_device_ids"] == []
  assert "local_device_ids" not in plan(**base).jax_kwargs


def test_slurm_step_defers_to_jax_detection():
  p = plan(SLURM_TWO_NODES_EIGHT_TASKS)
  assert p.kind == "slurm"
  # JAX fills coordinator (first node), count, id and one GPU per task from SLURM_*.
  assert dict(p.jax_kwargs) == {"initialization_timeout": 300}


def test_slurm_keeps_an_explicit_coordinator():
  p = plan(SLURM_TWO_NODES_EIGHT_TASKS, coordinator_address="gpu003:5555")
  assert p.jax_kwargs["coordinator_address"] == "gpu003:5555"
  assert "num_processes" not in p.jax_kwargs


def test_slurm_one_task_per_node_sees_all_node_gpus():
  env = {**SLURM_TWO_NODES_EIGHT_TASKS, "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
         "SLURM_LOCALID": "0"}
  assert plan(env).jax_kwargs["local_device_ids"] == []
  # ...unless the user pinned devices themselves.
  pinned = plan({**env, "ESSPR_LOCAL_DEVICE_IDS": "0,1"})
  assert pinned.jax_kwargs["local_device_ids"] == [0, 1]


def test_slurm_single_task_and_allocation_without_srun_are_single():
  assert plan({**SLURM_TWO_NODES_EIGHT_TASKS, "SLURM_NTASKS": "1"}).kind == "single"
  no_step = {k: v for k, v in SLURM_TWO_NODES_EIGHT_TASKS.items() if k != "SLURM_STEP_NODELIST"}
  assert plan(no_step).kind == "single"


def test_open_mpi_4_uses_jax_detection():
  env = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911",
         "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
         "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
  p = plan(env)
  assert p.kind == "ompi"
  assert "coordinator_address" not in p.jax_kwargs
  assert p.jax_kwargs["local_device_ids"] == [0]  # one GPU per rank
  # one rank per node drives all of the node's GPUs
  alone = plan({**env, "OMPI_COMM_WORLD_LOCAL_SIZE": "1"})
  assert alone.jax_kwargs["local_device_ids"] == []


def test_open_mpi_5_needs_a_coordinator_then_uses_ranks():
  env = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2",
         "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
  with pytest.raises(DistributedSetupError) as err:
    plan(env)
  assert err.value.key == "ESSPR_COORDINATOR"
  p = plan({**env, "ESSPR_COORDINATOR": "node1:8476"})
  assert p.kind == "ompi"
  assert (p.jax_kwargs["num_processes"], p.jax_kwargs["process_id"]) == (4, 2)
  assert p.jax_kwargs["coordinator_address"] == "node1:8476"
  assert p.jax_kwargs["local_device_ids"] == [1]
  assert plan({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}).kind == "single"


def test_tpu_vm_uses_jax_metadata_detection():
  p = plan(on_tpu_vm=True)
  assert p.kind == "tpu"
  assert dict(p.jax_kwargs) == {"initialization_timeout": 300}


def test_cluster_off_forces_single_and_bad_mode_is_named():
  assert plan({**SLURM_TWO_NODES_EIGHT_TASKS, "ESSPR_CLUSTER": "off"}).kind == "single"
  with pytest.raises(DistributedSetupError, match="ESSPR_CLUSTER"):
    plan({"ESSPR_CLUSTER": "slurmish"})


@pytest.fixture
def plain_environment(monkeypatch):
  """No cluster variables, even if the tests themselves run inside a SLURM/MPI job."""
  for key in list(os.environ):
    if key.startswith(("ESSPR_", "SLURM_", "OMPI_", "TPU_")):
      monkeypatch.delenv(key)
  monkeypatch.setattr(distributed, "running_on_tpu_vm", lambda: False)


def test_initialize_in_a_single_process_is_a_no_op(plain_environment):
  info = distributed.initialize()
  assert (info.process_id, info.num_processes, info.kind) == (0, 1, "single")
  assert info.is_primary and distributed.is_primary()
  assert info.global_device_count == info.local_device_count


_PROBE = textwrap.dedent("""
    import os, sys
    import numpy as np
    from esspr_jax import distributed
    info = distributed.initialize()
    from jax.experimental import multihost_utils
    ids = multihost_utils.process_allgather(np.array([info.process_id * 10 + 1]))
    sys.path.insert(0, "tests")
    from support import socket_inodes
    mine = socket_inodes(os.getpid())
    for table in ("tcp", "tcp6"):
      for row in open(f"/proc/net/{table}").read().splitlines()[1:]:
        f = row.split()
        if f[3] == "0A" and f[9] in mine:  # 0A: LISTEN
          print("LISTEN", table, f[1], flush=True)
    distributed.barrier("probe")
    # A stop request seen by process 1 only is agreed on by both; none by neither.
    agreed = (distributed.any_process(info.process_id == 1), distributed.any_process(False))
    print("PROBE", info.process_id, info.num_processes, info.local_device_count,
          info.global_device_count, int(distributed.is_primary()), ids.ravel().tolist(),
          *map(int, agreed), flush=True)
""")  # JAX leaves the distributed system at exit, after its backend (before can hang).


def _cluster_env(kind: str, pid: int, port: int) -> dict:
  """What each launcher leaves in a process's environment, for 2 processes."""
  if kind == "slurm":  # as `srun --ntasks=2` on one node would set it
    return {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(pid), "SLURM_LOCALID": str(pid), "SLURM_STEP_NUM_NODES": "1",
            "JAX_COORDINATOR_PORT": str(port)}
  if kind == "ompi5":  # as `mpirun -n 2` (Open MPI 5) would set it, plus our coordinator
    return {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": str(pid),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(pid), "ESSPR_COORDINATOR": f"127.0.0.1:{port}"}
  return {"ESSPR_COORDINATOR": f"127.0.0.1:{port}", "ESSPR_NUM_PROCESSES": "2",
          "ESSPR_PROCESS_ID": str(pid)}


@pytest.mark.parametrize("kind", ["explicit", "slurm", "ompi5"])
def test_two_real_processes_join_one_system(kind, tmp_path, monkeypatch):
  from launch import common, local_multiprocess
  for key in list(os.environ):
    if key.startswith(("ESSPR_", "SLURM_", "OMPI_", "JAX_COORDINATOR")):
      monkeypatch.delenv(key)
  port = common.free_port()
  base = {"PYTHONPATH": str(REPO), "ESSPR_INIT_TIMEOUT_S": "60", "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
  specs = [local_multiprocess.ProcessSpec(pid, {**base, **_cluster_env(kind, pid, port)},
                                          (sys.executable, "-c", _PROBE)) for pid in range(2)]
  group = local_multiprocess.ProcessGroup(specs, log_dir=str(tmp_path), echo=False,
                                          cwd=str(REPO)).start()
  code = group.wait(timeout_s=90)
  logs = [(tmp_path / f"process_{pid}.log").read_text() for pid in range(2)]
  assert code == 0, logs
  for pid, out in enumerate(logs):
    line = next(l for l in out.splitlines() if "PROBE" in l)
    assert line.split("PROBE ", 1)[1] == f"{pid} 2 3 6 {int(pid == 0)} [1, 11] 1 0"
  # Started directly (no launcher setting JAX_COORDINATOR_BIND_ADDRESS), the coordinator
  # listens on its address's host, 127.0.0.1, never on every interface ([::]).
  listeners = [l.split()[1:] for l in logs[0].splitlines() if l.startswith("LISTEN ")]
  assert any(address.endswith(f":{port:04X}") for _, address in listeners), listeners
  assert {address.rsplit(":", 1)[0] for _, address in listeners} <= LOOPBACK, listeners


def test_the_coordinator_binds_to_its_own_host_unless_told_otherwise():
  assert distributed.coordinator_bind_address("127.0.0.1:29555") == "127.0.0.1:29555"
  assert distributed.coordinator_bind_address("[::1]:29555") == "[::1]:29555"
  assert distributed.coordinator_bind_address("localhost:7") in ("127.0.0.1:7", "[::1]:7")
  with pytest.raises(DistributedSetupError, match="JAX_COORDINATOR_BIND_ADDRESS"):
    distributed.coordinator_bind_address("no-such-host.invalid:7")
  explicit = plan(coordinator_address="127.0.0.1:9", num_processes=2, process_id=0).jax_kwargs
  bound = distributed._with_bind_address(dict(explicit), {})
  assert bound == {**explicit, "coordinator_bind_address": "127.0.0.1:9"}
  # Only process 0 listens; an explicit bind address is left for JAX to read.
  other = plan(coordinator_address="127.0.0.1:9", num_processes=2, process_id=1).jax_kwargs
  assert distributed._with_bind_address(dict(other), {}) == other
  told = {"JAX_COORDINATOR_BIND_ADDRESS": "0.0.0.0:9"}
  assert distributed._with_bind_address(dict(explicit), told) == explicit


def test_single_process_agreement_and_barrier_are_local(plain_environment):
  assert distributed.any_process(True) is True
  assert distributed.any_process(False) is False
  distributed.barrier("alone")  # returns at once


def test_absl_flags_feed_the_plan():
  from absl import flags
  flag_values = flags.FlagValues()
  distributed.define_flags(flag_values)
  flag_values(["prog", "--coordinator_address=h:7", "--num_processes=3", "--process_id=2",
               "--local_device_ids=1"])
  p = plan(coordinator_address=flag_values.coordinator_address,
           num_processes=flag_values.num_processes, process_id=flag_values.process_id,
           local_device_ids=flag_values.local_device_ids)
  assert (p.kind, p.jax_kwargs["num_processes"], p.jax_kwargs["process_id"],
          p.jax_kwargs["local_device_ids"]) == ("explicit", 3, 2, [1])


def test_initialize_from_flags_reads_them(plain_environment):
  from absl import flags
  flag_values = flags.FlagValues()
  distributed.define_flags(flag_values)
  flag_values(["prog", "--num_processes=1"])
  assert distributed.initialize_from_flags(flag_values).kind == "single"
  flag_values(["prog", "--num_processes=2", "--process_id=0"])  # no coordinator anywhere
  with pytest.raises(DistributedSetupError, match="ESSPR_COORDINATOR"):
    distributed.initialize_from_flags(flag_values)
