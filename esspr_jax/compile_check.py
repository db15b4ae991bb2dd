"""`--mode=compile`: compile a config's real steps for a topology, before booking it.

The train step comes from the trainer's own builder (`train.plan_step`: mesh, rules,
shardings, donation, gradient caching, remat) and the embedding step is the eval /
export one (`retrieval.embed.make_embed_fn`), lowered with abstract inputs on the
topology's devices (topology.py: compile-only TPU devices, or `cpu:N`): nothing is
read, nothing is trained. XLA then reports, per device, the memory it planned, the
FLOPs the program executes and the collectives it inserted; next to them stand the
model's FLOPs (model_flops.py), the chip's HBM and peak (hardware.py), and the
roofline step time. A step that does not fit raises DoesNotFitError (exit 2), naming
the keys to change.
"""
from __future__ import annotations

import dataclasses

import jax

from esspr_jax import atomic_io
from esspr_jax import batch_layout
from esspr_jax import compile_report
from esspr_jax import hardware
from esspr_jax import metrics_writer as metrics_lib
from esspr_jax import model_flops
from esspr_jax import sharding
from esspr_jax import topology
from esspr_jax import train as train_lib
from esspr_jax.config.constants import MODALITIES
from esspr_jax.config.loss import composed_rows_per_process
from esspr_jax.errors import ConfigError
from esspr_jax.retrieval.embed import make_embed_fn

GiB = hardware.GiB
# At most this fraction of a chip's HBM: the rest is margin for what XLA's plan does
# not see (runtime buffers, fragmentation, a longer title bucket). docs/performance.md.
HBM_MARGIN = 0.9


@dataclasses.dataclass
class StepReport:
  """One compiled program on one device."""
  name: str
  memory: compile_report.Memory
  flops_per_device: float | None  # what the compiled program executes
  collectives: dict  # op -> {'count', 'bytes'}
  compile_seconds: float
  hlo: str = dataclasses.field(repr=False, default="")  # the optimized module (not in JSON)

  def to_json(self) -> dict:
    return {"name": self.name, "memory": {**dataclasses.asdict(self.memory),
                                          "total": self.memory.total},
            "flops_per_device": self.flops_per_device, "collectives": self.collectives,
            "compile_seconds": round(self.compile_seconds, 2)}


@dataclasses.dataclass
class CompileReport:
  topology: str
  device_kind: str
  devices: int
  hosts: int
  mesh: dict
  global_batch: int
  hbm_per_device: int | None
  peak_flops_per_device: float | None
  model_flops_per_step: float | None  # model_flops.py, the whole global batch
  train: StepReport
  embed: StepReport
  embed_batch: int

  @property
  def hbm_fraction(self) -> float | None:
    return self.train.memory.total / self.hbm_per_device if self.hbm_per_device else None

  @property
  def fits(self) -> bool | None:
    return None if self.hbm_fraction is None else self.hbm_fraction <= 1.0

  @property
  def within_margin(self) -> bool | None:
    return None if self.hbm_fraction is None else self.hbm_fraction <= HBM_MARGIN

  @property
  def compiled_flops_per_step(self) -> float | None:
    f = self.train.flops_per_device
    return f * self.devices if f else None

  @property
  def roofline_step_seconds(self) -> float | None:
    """The compiled step's FLOPs at the chip's peak: a floor no real step beats."""
    if not self.train.flops_per_device or not self.peak_flops_per_device:
      return None
    return self.train.flops_per_device / self.peak_flops_per_device

  def examples_per_second_per_device(self, mfu: float = 0.5) -> float | None:
    """Throughput per chip at `mfu` model-FLOPs utilisation."""
    if not self.model_flops_per_step or not self.peak_flops_per_device:
      return None
    step_seconds = self.model_flops_per_step / (mfu * self.peak_flops_per_device * self.devices)
    return self.global_batch / step_seconds / self.devices

  def to_json(self) -> dict:
    return {
        "topology": self.topology, "device_kind": self.device_kind, "devices": self.devices,
        "hosts": self.hosts, "mesh": self.mesh, "global_batch": self.global_batch,
        "hbm_per_device": self.hbm_per_device, "hbm_fraction": self.hbm_fraction,
        "fits": self.fits, "within_margin": self.within_margin, "hbm_margin": HBM_MARGIN,
        "peak_flops_per_device": self.peak_flops_per_device,
        "model_flops_per_step": self.model_flops_per_step,
        "compiled_flops_per_step": self.compiled_flops_per_step,
        "roofline_step_seconds": self.roofline_step_seconds,
        "examples_per_second_per_device_at_50pct_mfu": self.examples_per_second_per_device(),
        "train_step": self.train.to_json(), "embed_step": self.embed.to_json(),
        "embed_batch": self.embed_batch}

  def table(self) -> str:
    """A short console table: memory per device, FLOPs, collectives, compile time."""
    hbm = _size(self.hbm_per_device) if self.hbm_per_device else "unknown (CPU)"
    lines = [f"[compile] {self.topology}: {self.devices} x {self.device_kind} "
             f"({self.hosts} host{'s' if self.hosts > 1 else ''}), mesh {self.mesh}, "
             f"global batch {self.global_batch}, HBM per device {hbm}",
             "| step | arguments | temporaries | outputs | total | % HBM | TFLOP/device "
             "| compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for step in (self.train, self.embed):
      m = step.memory
      share = f"{100 * m.total / self.hbm_per_device:.1f}" if self.hbm_per_device else "-"
      flops = f"{step.flops_per_device / 1e12:.4g}" if step.flops_per_device else "-"
      lines.append(f"| {step.name} | {_size(m.arguments)} | {_size(m.temporaries)} | "
                   f"{_size(m.outputs - m.aliased)} | {_size(m.total)} | {share} | {flops} | "
                   f"{step.compile_seconds:.1f} |")
    model, compiled = self.model_flops_per_step, self.compiled_flops_per_step
    line = f"model TFLOP/step {model / 1e12:.4g}" if model else "model FLOPs unknown"
    if model and compiled:
      line += f"; compiled / model {compiled / model:.2f}"
    if self.roofline_step_seconds:
      line += (f"; roofline step {self.roofline_step_seconds:.4g} s; at 50% MFU "
               f"{self.examples_per_second_per_device():.4g} examples/s per device")
    lines.append(line)
    coll = ", ".join(f"{op} x{c['count']} ({_size(c['bytes'])})"
                     for op, c in sorted(self.train.collectives.items()))
    lines.append(f"train-step collectives per device: {coll or 'none'}")
    if self.within_margin is False:
      lines.append(f"warning: the train step uses {100 * self.hbm_fraction:.1f}% of HBM, "
                   f"above the {100 * HBM_MARGIN:.0f}% margin")
    return "\n".join(lines)


def _size(n: int) -> str:
  return f"{n / GiB:.2f} GiB" if n >= GiB // 2 else f"{n / 2**20:.1f} MiB"


def _hosts(devices) -> int:
  return len({d.process_index for d in devices})


def _train_views(config, views):
  if config.train.hard_negatives.enabled:
    return batch_layout.with_hard_negative_side(views)
  return views


def abstract_global_batch(config, hosts: int) -> dict:
  """The global training batch the run would feed, for `hosts` processes."""
  tc = config.train
  if tc.batch_size % hosts:
    raise ConfigError("train.batch_size", f"{tc.batch_size} is not divisible by the "
                      f"{hosts} hosts of the topology")
  composed = composed_rows_per_process(config, hosts) * hosts
  hard = tc.batch_size * tc.hard_negatives.per_trigger if tc.hard_negatives.enabled else 0
  return batch_layout.abstract_train_batch(config, tc.batch_size, composed, hard)


def _step_report(name: str, lowered, config) -> StepReport:
  compiled, seconds = compile_report.compile_lowered(lowered, config, f"the {name}")
  memory = compile_report.Memory.of(compiled)
  hlo = compiled.as_text()
  flops = metrics_lib.executable_flops(compiled, 1, hlo)
  return StepReport(name=name, memory=memory, flops_per_device=flops,
                    collectives=compile_report.collective_summary(hlo), compile_seconds=seconds,
                    hlo=hlo)


def _embed_lowered(config, model, plan: train_lib.StepPlan, hosts: int):
  """The eval / export embedding call for one global eval batch, as the trainer's eval
  hook runs it: params as trained, the batch split over the batch shards."""
  rows = config.eval.batch_size * hosts
  shards = sharding.batch_shards(plan.mesh, sharding.rules(config.train))
  side_sharding = (plan.batch_sharding if rows % shards == 0
                   else sharding.replicated(plan.mesh))
  side = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=side_sharding),
      batch_layout.abstract_side(config.model, rows))
  modalities = tuple(m for m in MODALITIES if m in model.available)
  with jax.set_mesh(plan.mesh):
    return make_embed_fn(model, modalities).lower(plan.abstract_state.params, side), rows


def compile_for(config, topology_name: str) -> CompileReport:
  """Compiles `config`'s train and embedding steps for `topology_name` (see module doc)."""
  devices = topology.devices(topology_name)
  hosts = _hosts(devices)
  model, loss_fn, views = train_lib.default_model_and_loss(config)
  views = _train_views(config, views)
  plan = train_lib.plan_step(config, model, loss_fn, views,
                             abstract_global_batch(config, hosts), devices)
  train_report = _step_report("train step", plan.lowered, config)
  embed_lowered, embed_rows = _embed_lowered(config, model, plan, hosts)
  embed_report = _step_report("embed step", embed_lowered, config)
  kind = devices[0].device_kind
  return CompileReport(
      topology=topology_name, device_kind=kind, devices=len(devices), hosts=hosts,
      mesh=dict(plan.mesh.shape), global_batch=config.train.batch_size,
      hbm_per_device=compile_report.device_hbm(devices[0]),
      peak_flops_per_device=hardware.peak_flops_per_device(config.train.peak_flops, kind),
      model_flops_per_step=model_flops.model_flops_per_step(config, views),
      train=train_report, embed=embed_report, embed_batch=embed_rows)


def report_path(workdir, topology_name: str):
  return workdir / "compile" / f"{topology_name}.json"


def run(config, workdir, topology_name: str) -> CompileReport:
  """--mode=compile: the report as a table and as `<workdir>/compile/<topology>.json`;
  DoesNotFitError (exit 2) when the train step exceeds the device's HBM."""
  report = compile_for(config, topology_name)
  path = report_path(workdir, topology_name)
  if not atomic_io.is_remote(path):
    path.parent.mkdir(parents=True, exist_ok=True)
  atomic_io.write_json(path, report.to_json())
  if report.fits is False:
    raise compile_report.DoesNotFitError(
        "the train step", f"it needs {report.train.memory.total / GiB:.2f} GiB per device "
        f"of {report.hbm_per_device / GiB:.2f} GiB on {topology_name}", config)
  return report

