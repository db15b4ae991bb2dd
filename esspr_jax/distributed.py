"""Multi-process start-up: join every process of a run into one JAX system.

Call `initialize()` first thing in a command, before anything touches a device
(`jax.devices()`, a jit, `device_put`): JAX fixes the device set at backend start.

Where the settings come from, first match wins:
1. explicit arguments (main's `--coordinator_address/--num_processes/--process_id`),
   each falling back to its env var ESSPR_COORDINATOR / ESSPR_NUM_PROCESSES /
   ESSPR_PROCESS_ID (what `launch/local_multiprocess.py` sets);
2. a SLURM job step (`srun`) or an Open MPI job (`mpirun`): JAX's cluster
   detection, with our fixes for one-process-per-node and for Open MPI 5;
3. a Cloud TPU VM: JAX reads the slice from the VM metadata;
4. otherwise one process: nothing to do.

Settings are resolved by a pure function (`plan_initialization`) so every rule is
testable without starting anything; `initialize` only carries the plan out.

Process 0's coordinator listens on the coordinator address's own host (what that name
resolves to here), for every way of starting: JAX alone would listen on every interface
([::]:PORT). $JAX_COORDINATOR_BIND_ADDRESS, when set, says otherwise (e.g. 0.0.0.0:PORT).
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import socket
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

# JAX internals with no public entry (the TPU VM probe, its own cluster detection, the
# preemption service); a JAX without them fails only where they are used.
try:
  from jax._src import cloud_tpu_init, clusters
  from jax._src import distributed as jax_distributed
except ImportError:  # pragma: no cover
  cloud_tpu_init = clusters = jax_distributed = None

from esspr_jax.errors import ConfigError

log = logging.getLogger(__name__)

ENV_COORDINATOR = "ESSPR_COORDINATOR"
ENV_NUM_PROCESSES = "ESSPR_NUM_PROCESSES"
ENV_PROCESS_ID = "ESSPR_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "ESSPR_LOCAL_DEVICE_IDS"
ENV_INIT_TIMEOUT = "ESSPR_INIT_TIMEOUT_S"
# 'auto' (default) or 'off': 'off' forces a single process even inside a cluster job.
ENV_CLUSTER = "ESSPR_CLUSTER"
ENV_BIND = "JAX_COORDINATOR_BIND_ADDRESS"  # JAX's own: where process 0's coordinator listens

_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                    "SLURM_LOCALID")
_DEFAULT_INIT_TIMEOUT_S = 300


class DistributedSetupError(ConfigError):
  """The multi-process settings are incomplete or inconsistent.

  `key` names the flag or environment variable to fix (not a config key)."""

  def __init__(self, key: str, message: str):
    ValueError.__init__(self, f"{key}: {message}")
    self.key = key


@dataclasses.dataclass(frozen=True)
class InitPlan:
  """What `initialize` will do. `kind` is 'single' (nothing), 'explicit', 'slurm',
  'ompi' or 'tpu'; `jax_kwargs` go to `jax.distributed.initialize` verbatim."""
  kind: str
  jax_kwargs: Mapping[str, object] = dataclasses.field(default_factory=dict)

  @property
  def is_single(self) -> bool:
    return self.kind == "single"


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  """Where this process sits in the run, as JAX sees it after start-up."""
  process_id: int
  num_processes: int
  local_device_count: int
  global_device_count: int
  kind: str

  @property
  def is_primary(self) -> bool:
    return self.process_id == 0


def _parse_int(value, key: str, minimum: int) -> int | None:
  if value is None or value == "":
    return None
  try:
    number = int(value)
  except (TypeError, ValueError):
    raise DistributedSetupError(key, f"expected an integer, got {value!r}") from None
  if number < minimum:
    raise DistributedSetupError(key, f"must be >= {minimum}, got {number}")
  return number


def _parse_device_ids(value, key: str) -> list[int] | None:
  """'0,1,3' -> [0, 1, 3]; 'all' -> [] (JAX then restricts nothing); unset -> None."""
  if value is None or value == "":
    return None
  if isinstance(value, str):
    if value.strip().lower() == "all":
      return []
    parts = [p.strip() for p in value.split(",")]
  else:
    parts = list(value)
  try:
    ids = [int(p) for p in parts]
  except (TypeError, ValueError):
    raise DistributedSetupError(
        key, f"expected comma-separated device ids or 'all', got {value!r}") from None
  if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
    raise DistributedSetupError(key, f"device ids must be distinct and >= 0, got {ids}")
  return ids


def _check_address(address: str, key: str) -> str:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedSetupError(key, f"expected HOST:PORT, got {address!r}")
  return address


def _slurm_tasks(environ: Mapping[str, str]) -> int | None:
  if all(v in environ for v in _SLURM_STEP_VARS):
    return _parse_int(environ["SLURM_NTASKS"], "SLURM_NTASKS", 1)
  return None


def _one_task_per_node_under_slurm(environ: Mapping[str, str], tasks: int) -> bool:
  nodes = environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_NNODES")
  return nodes is not None and nodes.isdigit() and int(nodes) == tasks


def plan_initialization(*,
                        coordinator_address: str | None = None,
                        num_processes: int | str | None = None,
                        process_id: int | str | None = None,
                        local_device_ids: str | Sequence[int] | None = None,
                        initialization_timeout_s: int | str | None = None,
                        environ: Mapping[str, str] | None = None,
                        on_tpu_vm: bool | None = None) -> InitPlan:
  """Decides how this process joins the run, from arguments and `environ` alone.

  Raises DistributedSetupError naming the flag/env var when the explicit settings
  are half given (e.g. a coordinator but no process id) or malformed.
  """
  environ = os.environ if environ is None else environ
  if on_tpu_vm is None:
    on_tpu_vm = running_on_tpu_vm()

  cluster_mode = environ.get(ENV_CLUSTER, "auto").strip().lower() or "auto"
  if cluster_mode not in ("auto", "off"):
    raise DistributedSetupError(ENV_CLUSTER, f"expected 'auto' or 'off', got {cluster_mode!r}")

  def pick(arg, env_key):
    """The flag wins over the env var; remembers which one was used for messages."""
    if arg is not None and arg != "":
      return arg, f"--{_FLAG_FOR_ENV[env_key]}"
    return environ.get(env_key) or None, env_key

  coordinator, coordinator_key = pick(coordinator_address, ENV_COORDINATOR)
  processes_raw, processes_key = pick(num_processes, ENV_NUM_PROCESSES)
  pid_raw, pid_key = pick(process_id, ENV_PROCESS_ID)
  devices_raw, devices_key = pick(local_device_ids, ENV_LOCAL_DEVICE_IDS)
  timeout_raw, timeout_key = pick(initialization_timeout_s, ENV_INIT_TIMEOUT)

  if coordinator is not None:
    coordinator = _check_address(str(coordinator), coordinator_key)
  processes = _parse_int(processes_raw, processes_key, 1)
  pid = _parse_int(pid_raw, pid_key, 0)
  devices = _parse_device_ids(devices_raw, devices_key)
  timeout = _parse_int(timeout_raw, timeout_key, 1) or _DEFAULT_INIT_TIMEOUT_S
  if processes is not None and pid is not None and pid >= processes:
    raise DistributedSetupError(pid_key, f"process id {pid} must be < {processes_key}={processes}")

  common = {"initialization_timeout": timeout}
  if devices is not None:
    common["local_device_ids"] = devices

  if cluster_mode == "off" or processes == 1:
    return InitPlan("single")

  given = {coordinator_key: coordinator, processes_key: processes, pid_key: pid}
  if all(v is not None for v in given.values()):
    return InitPlan("explicit", {"coordinator_address": coordinator, "num_processes": processes,
                                 "process_id": pid, "cluster_detection_method": "deactivate",
                                 **common})
  partial = {k: v for k, v in given.items() if v is not None}

  slurm_tasks = _slurm_tasks(environ)
  if slurm_tasks is not None:
    if slurm_tasks == 1:
      return InitPlan("single")
    kwargs = {**common, **_given_jax_kwargs(coordinator, processes, pid)}
    if devices is None and _one_task_per_node_under_slurm(environ, slurm_tasks):
      # JAX would pin each process to GPU SLURM_LOCALID (=0): one process per node
      # must see all of its node's GPUs instead.
      kwargs["local_device_ids"] = []
    return InitPlan("slurm", kwargs)

  if "OMPI_COMM_WORLD_SIZE" in environ:
    world = _parse_int(environ["OMPI_COMM_WORLD_SIZE"], "OMPI_COMM_WORLD_SIZE", 1)
    if world == 1:
      return InitPlan("single")
    rank = _parse_int(environ.get("OMPI_COMM_WORLD_RANK"), "OMPI_COMM_WORLD_RANK", 0)
    local_rank = _parse_int(environ.get("OMPI_COMM_WORLD_LOCAL_RANK"),
                            "OMPI_COMM_WORLD_LOCAL_RANK", 0)
    if devices is None and not on_tpu_vm:
      # Like JAX's own Open MPI support: rank i of a node drives GPU i; but a lone
      # rank on its node drives all of them.
      if environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") == "1":
        common["local_device_ids"] = []
      elif local_rank is not None:
        common["local_device_ids"] = [local_rank]
    if "OMPI_MCA_orte_hnp_uri" in environ and coordinator is None:
      return InitPlan("ompi", dict(common))  # Open MPI 4: JAX finds the launcher's address.
    if coordinator is None:
      raise DistributedSetupError(
          ENV_COORDINATOR, "Open MPI 5 does not publish a coordinator address; set "
          f"{ENV_COORDINATOR}=HOST:PORT (rank 0's host, a free port) for every rank")
    if rank is None:
      raise DistributedSetupError("OMPI_COMM_WORLD_RANK", "missing under Open MPI")
    return InitPlan("ompi", {"coordinator_address": coordinator, "num_processes": world,
                             "process_id": rank, "cluster_detection_method": "deactivate",
                             **common})

  if on_tpu_vm:
    kwargs = {**common, **_given_jax_kwargs(coordinator, processes, pid)}
    return InitPlan("tpu", kwargs)  # JAX reads workers and ids from the TPU metadata.

  if partial:
    missing = [k for k, v in given.items() if v is None]
    raise DistributedSetupError(
        missing[0],
        f"multi-process settings are half given ({', '.join(f'{k}={v}' for k, v in partial.items())}) "
        f"and no SLURM/Open MPI/TPU environment was found to fill in the rest; "
        f"also set {' and '.join(missing)}")
  return InitPlan("single")


def _given_jax_kwargs(coordinator, processes, pid) -> dict:
  """Explicit values JAX's cluster detection should keep (it fills only the rest)."""
  named = {"coordinator_address": coordinator, "num_processes": processes, "process_id": pid}
  return {k: v for k, v in named.items() if v is not None}


_FLAG_FOR_ENV = {
    ENV_COORDINATOR: "coordinator_address",
    ENV_NUM_PROCESSES: "num_processes",
    ENV_PROCESS_ID: "process_id",
    ENV_LOCAL_DEVICE_IDS: "local_device_ids",
    ENV_INIT_TIMEOUT: "initialization_timeout_s",
}


def running_on_tpu_vm() -> bool:
  """True on a Cloud TPU VM (JAX checks for TPU chips on the PCI bus at import)."""
  try:
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):
    return "TPU_WORKER_HOSTNAMES" in os.environ or "TPU_ACCELERATOR_TYPE" in os.environ


def initialize(coordinator_address: str | None = None,
               num_processes: int | str | None = None,
               process_id: int | str | None = None,
               local_device_ids: str | Sequence[int] | None = None,
               initialization_timeout_s: int | str | None = None) -> ProcessInfo:
  """Joins this process to the run (no-op for one process); safe to call twice.

  Must run before the first device use. Returns where this process sits.
  """
  if not jax.distributed.is_initialized():
    plan = plan_initialization(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout_s=initialization_timeout_s)
    if not plan.is_single:
      kwargs = _with_bind_address(dict(plan.jax_kwargs), os.environ)
      log.info("Starting multi-process JAX (%s): %s", plan.kind, kwargs)
      jax.distributed.initialize(**kwargs)
    kind = plan.kind
  else:
    kind = "already-initialized"
  info = process_info(kind)
  if info.num_processes > 1:
    log.info("Process %d of %d: %d local / %d global devices", info.process_id,
             info.num_processes, info.local_device_count, info.global_device_count)
  return info


def coordinator_bind_address(coordinator: str) -> str:
  """HOST:PORT for process 0's coordinator to listen on: an address `coordinator`'s host
  resolves to here (a non-loopback one if it has any), never every interface."""
  host, _, port = coordinator.rpartition(":")
  host = host.strip("[]")
  try:
    found = [info[4][0] for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)]
  except (socket.gaierror, UnicodeError) as e:
    raise DistributedSetupError(
        ENV_COORDINATOR, f"cannot resolve the coordinator host {host!r} ({e}); set "
        f"{ENV_BIND}=ADDRESS:{port} to say where process 0 listens") from None
  chosen = next((a for a in found if not ipaddress.ip_address(a.split("%")[0]).is_loopback),
                found[0])
  if ipaddress.ip_address(chosen.split("%")[0]).is_loopback and host != "localhost" \
      and not _is_ip(host):
    log.warning("Coordinator host %r resolves to %s here: only processes on this machine can "
                "join; set %s=ADDRESS:%s for a run across machines", host, chosen, ENV_BIND, port)
  return f"[{chosen}]:{port}" if ":" in chosen else f"{chosen}:{port}"


def _is_ip(host: str) -> bool:
  try:
    ipaddress.ip_address(host)
  except ValueError:
    return False
  return True


def _with_bind_address(kwargs: dict, environ: Mapping[str, str]) -> dict:
  """`kwargs` for `jax.distributed.initialize` with process 0's coordinator bound to its
  host. Where JAX's cluster detection would fill in the coordinator, it is filled in here
  first (the same detection), so its host is known too."""
  if environ.get(ENV_BIND):
    return kwargs  # JAX reads it
  if any(kwargs.get(k) is None for k in ("coordinator_address", "num_processes", "process_id")):
    devices = kwargs.get("local_device_ids")
    if devices is None and environ.get("JAX_LOCAL_DEVICE_IDS"):
      devices = [int(d) for d in environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
    coordinator, processes, pid, devices = (
        clusters.ClusterEnv.auto_detect_unset_distributed_params(
            kwargs.get("coordinator_address") or environ.get("JAX_COORDINATOR_ADDRESS"),
            kwargs.get("num_processes"), kwargs.get("process_id"), devices,
            kwargs.get("cluster_detection_method"), kwargs.get("initialization_timeout")))
    if None in (coordinator, processes, pid):
      return kwargs  # JAX says what is missing
    kwargs.update(coordinator_address=coordinator, num_processes=processes, process_id=pid,
                  cluster_detection_method="deactivate")
    if devices is not None:
      kwargs["local_device_ids"] = devices
  if kwargs["process_id"] == 0:
    kwargs["coordinator_bind_address"] = coordinator_bind_address(kwargs["coordinator_address"])
  return kwargs


def define_flags(flag_values=None) -> None:
  """Adds --coordinator_address, --num_processes, --process_id, --local_device_ids
  to an absl command (each defaults to its ESSPR_* env var; see `initialize`)."""
  flag_values = flags.FLAGS if flag_values is None else flag_values
  for define, name, help_text in (
      (flags.DEFINE_string, "coordinator_address",
       f"HOST:PORT of process 0 (default: ${ENV_COORDINATOR}, or the cluster's)"),
      (flags.DEFINE_integer, "num_processes",
       f"processes in the run (default: ${ENV_NUM_PROCESSES}, or the cluster's)"),
      (flags.DEFINE_integer, "process_id",
       f"this process's rank (default: ${ENV_PROCESS_ID}, or the cluster's)"),
      (flags.DEFINE_string, "local_device_ids",
       f"GPUs of this process, e.g. 0,1 or all (default: ${ENV_LOCAL_DEVICE_IDS})")):
    define(name, None, help_text, flag_values=flag_values)


def initialize_from_flags(flag_values=None) -> ProcessInfo:
  """`initialize` with the values of the flags `define_flags` added."""
  f = flags.FLAGS if flag_values is None else flag_values
  return initialize(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
                    process_id=f.process_id, local_device_ids=f.local_device_ids)


def process_info(kind: str = "current") -> ProcessInfo:
  """This process's place in the run (starts the backend if it is not yet up)."""
  return ProcessInfo(process_id=jax.process_index(), num_processes=jax.process_count(),
                     local_device_count=jax.local_device_count(),
                     global_device_count=jax.device_count(), kind=kind)


def is_primary() -> bool:
  """True on process 0: the one that writes logs, console output, metadata, manifests.

  The one switch for every process-0-only action, so multi-host runs stay consistent."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on at least one (a collective: every
  process must call it at the same point). One process: `flag` itself.

  Used to agree on a stop step: a SIGTERM seen by some processes only must still stop
  all of them after the same step, or the collective save would hang."""
  if jax.process_count() == 1:
    return bool(flag)
  flags_of_all = multihost_utils.process_allgather(np.array([int(bool(flag))], np.int32))
  return bool(np.asarray(flags_of_all).any())


def preemption_service_running() -> bool:
  """True in a multi-process run whose JAX preemption service is up (the default after
  `jax.distributed.initialize`): JAX then catches SIGTERM itself and agrees on a stop
  step in the background (`multihost_utils.reached_preemption_sync_point`)."""
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    return False
  state = getattr(jax_distributed, "global_state", None)
  return getattr(state, "preemption_sync_manager", None) is not None


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (no-op for one process), e.g. until
  process 0 has prepared the files the others are about to open."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
