"""Beam's local batch runner without its two surprises: no Prism, no wildcard listeners.

Beam 2.77's `DirectRunner` first tries Prism for a batch pipeline: it opens a worker-pool
gRPC server on `[::]` (every interface) and downloads a Go job-server binary from
GitHub; offline that fails and it falls back to the Python FnApiRunner. The FnApiRunner
itself, in `multi_threading`/`multi_processing` mode, binds its control, data, state and
logging servers (and one logging server per worker subprocess) to `[::]:0` while telling
its workers to dial `localhost`.

`LocalRunner` runs the FnApiRunner directly (what DirectRunner ends up running for a
batch job, with the same pipeline options handed to its workers) and, for the length of
the run, makes those servers bind `localhost:0`: loopback only (127.0.0.1 and ::1), the
addresses the workers already dial. Mining maps `DirectRunner` to it (ingest/mining/);
`--runner=PrismRunner` still reaches Prism for anyone who wants it.
"""
import contextlib
import threading

from apache_beam.portability.api import beam_provision_api_pb2
from apache_beam.runners.portability import local_job_service
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.fn_api_runner import worker_handlers
from apache_beam.runners.portability.portable_runner import JobServiceHandle
from apache_beam.runners.runner import PipelineRunner

# The runner names mining treats as "run here, on this machine".
LOCAL_RUNNER_NAMES = ("DirectRunner", "SwitchingDirectRunner", "FnApiRunner")
LOCAL_RUNNER_PATH = f"{__name__}.LocalRunner"

_LOOPBACK = "localhost"
_patch_lock = threading.Lock()


def is_local(runner_name: str) -> bool:
  return runner_name.strip() in LOCAL_RUNNER_NAMES


def _loopback_address(address: str) -> str:
  """'[::]:0' / '0.0.0.0:N' / ':N' -> 'localhost:N'; anything else unchanged."""
  host, sep, port = address.rpartition(":")
  if sep and host in ("[::]", "0.0.0.0", "", "*"):
    return f"{_LOOPBACK}:{port}"
  return address


class _LoopbackServer:
  """A grpc.Server whose insecure ports bind loopback instead of every interface."""

  def __init__(self, server):
    self._server = server

  def add_insecure_port(self, address):
    return self._server.add_insecure_port(_loopback_address(address))

  def __getattr__(self, name):
    return getattr(self._server, name)


class _LoopbackGrpc:
  """Stands in for the `grpc` module inside Beam's worker_handlers during a run."""

  def __init__(self, grpc_module):
    self._grpc = grpc_module

  def server(self, *args, **kwargs):
    return _LoopbackServer(self._grpc.server(*args, **kwargs))

  def __getattr__(self, name):
    return getattr(self._grpc, name)


def _server_modules() -> tuple:
  """The Beam modules that create the FnApiRunner's servers (GrpcServer, and
  SubprocessSdkWorker's per-worker logging server)."""
  return worker_handlers, local_job_service


@contextlib.contextmanager
def loopback_grpc_servers():
  """While active, the servers those modules start bind loopback. Only their view of
  `grpc` changes (grpc.server); clients and the rest of the process are untouched."""
  modules = _server_modules()
  with _patch_lock:
    real = [m.grpc for m in modules]
    for m, g in zip(modules, real):
      m.grpc = _LoopbackGrpc(g)
    try:
      yield
    finally:
      for m, g in zip(modules, real):
        m.grpc = g


class LocalRunner(PipelineRunner):
  """The FnApiRunner with loopback-only servers (module doc). Batch pipelines only."""

  def run_pipeline(self, pipeline, options):
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    provision = fn_runner.ExtendedProvisionInfo(
        beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    with loopback_grpc_servers():
      return fn_runner.FnApiRunner(provision_info=provision).run_pipeline(pipeline, options)
