"""Config section `train`: steps, batch, optimizer, schedule, mesh, sharding rules,
checkpointing and logging.

The mesh has three named axes (`data`, `fsdp`, `tensor`). `sharding_rules` is the ONE
table that maps the model's logical axis names onto them; nothing else in the code
knows the mesh, so a new layout is a config change.
"""
import ml_collections

from esspr_jax.config.checks import check as _check
from esspr_jax.config.checks import in_unit as _in_unit
from esspr_jax.config.checks import is_int as _is_int
from esspr_jax.config.checks import is_number as _is_number

MESH_AXES = ("data", "fsdp", "tensor")
PLATFORMS = ("any", "cpu", "gpu", "tpu")

# Logical names the model puts on params and activations (docs/architecture.md).
PARAM_AXIS_NAMES = ("embed", "mlp", "heads", "head_dim", "vocab", "patch_in", "pos",
                    "type", "proj", "layers")
ACTIVATION_AXIS_NAMES = ("batch", "seq", "act_embed", "act_mlp", "act_heads",
                         "act_head_dim")
LOGICAL_AXIS_NAMES = PARAM_AXIS_NAMES + ACTIVATION_AXIS_NAMES

# FSDP shards the model dimension of every weight over `fsdp`; tensor parallelism
# splits attention heads, MLP hidden units and the vocabulary over `tensor`; the batch
# is split over `data` and `fsdp` (FSDP devices each see their own examples).
DEFAULT_SHARDING_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("head_dim", None),
    ("patch_in", None),
    ("pos", None),
    ("type", None),
    ("proj", None),
    ("layers", None),
    ("seq", None),
    ("act_embed", None),
    ("act_head_dim", None),
)

_PER_PRESET = {
    "tiny": dict(steps=6, batch_size=16, learning_rate=1e-3, warmup_steps=2,
                 log_every=1, checkpoint_every=2),
    "demo": dict(steps=300, batch_size=64, learning_rate=1e-3, warmup_steps=30,
                 log_every=20, checkpoint_every=100),
    "base": dict(steps=100_000, batch_size=4096, learning_rate=5e-4, warmup_steps=2_000,
                 log_every=100, checkpoint_every=2_000),
    "large": dict(steps=200_000, batch_size=16384, learning_rate=3e-4,
                  warmup_steps=5_000, log_every=100, checkpoint_every=2_000),
}


def default_config(preset: str) -> ml_collections.ConfigDict:
  p = _PER_PRESET[preset]
  c = ml_collections.ConfigDict()
  c.steps = p["steps"]
  c.batch_size = p["batch_size"]  # global, over all processes and devices
  c.grad_accum_steps = 1  # >1: micro-batches by gradient caching (same loss, less memory)
  # Global composed-query triplets per step (read only while loss.composed.weight > 0).
  c.composed_batch_size = {"tiny": 8, "demo": 32}.get(preset, 256)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices left after the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.sharding_rules = DEFAULT_SHARDING_RULES

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = p["learning_rate"]
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_norm = 1.0  # global-norm clipping; 0 disables
  # No decay for params that carry one of these logical axes (embedding tables) ...
  c.optimizer.no_decay_axes = ("vocab", "pos", "type")
  # ... nor for leaves with these names, nor for any leaf with fewer than 2 dims.
  c.optimizer.no_decay_names = ("bias", "scale", "embedding", "logit_scale",
                                "logit_bias")

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "warmup_cosine"  # or "warmup_constant"
  c.schedule.warmup_steps = p["warmup_steps"]
  c.schedule.end_lr_ratio = 0.0  # final lr as a fraction of the peak

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = p["checkpoint_every"]
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.log_every = p["log_every"]
  # How often the eval hook runs is config.eval.every_steps (0: only at the end).
  c.eval_at_end = True
  c.skip_nonfinite = False  # False: stop on a non-finite loss; True: skip that update
  # Peak FLOP/s of ONE device for MFU; 0 looks the device kind up (unknown: no MFU).
  c.peak_flops = 0.0
  # The platform this config is laid out for: 'any', 'cpu', 'gpu' or 'tpu'. With 'gpu'
  # or 'tpu' a run refuses a CPU-only JAX unless --allow_cpu (esspr_jax/stages.py).
  c.platform = "any"
  # XLA's persistent compilation cache, so a restarted or preempted job does not pay
  # the compile again: '' is the process's own cache (JAX_COMPILATION_CACHE_DIR) if
  # it has one, else <workdir>/compile_cache; a path or gs:// URL; or 'off'.
  c.compilation_cache_dir = ""
  # Guards the jitted step against implicit host<->device copies.
  c.transfer_guard = "disallow"
  # Global batches built and sent to the devices ahead of the running step (a
  # background thread); 0 builds each batch inline.
  c.prefetch = 2
  # True: the loop before it was asynchronous (metrics read and preemption agreed every
  # step, batches built inline); kept for benchmarks/bench_loop.py's comparison.
  c.sync_loop = False

  # Hard negatives mined from the training catalog with the current params
  # (esspr_jax/hard_negatives/, docs/losses.md "Hard negatives").
  c.hard_negatives = ml_collections.ConfigDict()
  c.hard_negatives.enabled = False
  c.hard_negatives.every_steps = {"tiny": 2, "demo": 50}.get(preset, 1000)
  c.hard_negatives.per_trigger = 1  # extra gallery rows per pair
  # Mining may take at most this fraction of the training time since the previous
  # mining; beyond it the next mining is postponed. 0: no bound.
  c.hard_negatives.max_cost_fraction = 0.2
  return c




def validate_rules(rules, key: str = "train.sharding_rules") -> None:
  """The rules table: (logical_name, mesh_axes) pairs over known names and axes."""
  _check(isinstance(rules, (tuple, list)), key, "must be a tuple of (logical_name, mesh_axes)")
  for i, rule in enumerate(rules):
    _check(isinstance(rule, (tuple, list)) and len(rule) == 2, f"{key}[{i}]",
           f"must be a (logical_name, mesh_axes) pair, got {rule!r}")
    name, axes = rule
    _check(name in LOGICAL_AXIS_NAMES, f"{key}[{i}]",
           f"unknown logical axis {name!r}; known: {LOGICAL_AXIS_NAMES}")
    mesh_axes = (axes,) if isinstance(axes, str) or axes is None else tuple(axes)
    for axis in mesh_axes:
      _check(axis is None or axis in MESH_AXES, f"{key}[{i}]",
             f"unknown mesh axis {axis!r} for {name!r}; mesh axes are {MESH_AXES}")


def validate(config: ml_collections.ConfigDict) -> None:
  t = config.train
  for key in ("steps", "batch_size", "grad_accum_steps", "log_every"):
    _check(_is_int(t[key]) and t[key] >= 1, f"train.{key}", f"must be an int >= 1, got {t[key]!r}")
  _check(t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
         f"must divide train.batch_size={t.batch_size}, got {t.grad_accum_steps}")

  sizes = [t.mesh[a] for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    _check(_is_int(size) and (size >= 1 or size == -1), f"train.mesh.{axis}",
           f"must be an int >= 1 or -1 (all remaining devices), got {size!r}")
  _check(sizes.count(-1) <= 1, "train.mesh", "at most one axis may be -1")
  validate_rules(t.sharding_rules)

  o = t.optimizer
  _check(o.name == "adamw", "train.optimizer.name", f"only 'adamw' is supported, got {o.name!r}")
  _check(o.learning_rate > 0, "train.optimizer.learning_rate", "must be > 0")
  for name in ("b1", "b2"):
    _check(_is_number(o[name]) and 0 <= o[name] < 1, f"train.optimizer.{name}",
           f"must be in [0, 1), got {o[name]!r}")
  # Adam divides by sqrt(nu) + eps: 0 gives 0/0 = NaN for a param without gradient.
  _check(_is_number(o.eps) and o.eps > 0, "train.optimizer.eps", f"must be > 0, got {o.eps!r}")
  _check(o.weight_decay >= 0, "train.optimizer.weight_decay", "must be >= 0")
  _check(o.clip_norm >= 0, "train.optimizer.clip_norm", "must be >= 0 (0 disables)")

  s = t.schedule
  _check(s.name in ("warmup_cosine", "warmup_constant"), "train.schedule.name",
         f"must be 'warmup_cosine' or 'warmup_constant', got {s.name!r}")
  _check(_is_int(s.warmup_steps) and 0 <= s.warmup_steps <= t.steps,
         "train.schedule.warmup_steps", f"must be in [0, train.steps={t.steps}]")
  _check(0 <= s.end_lr_ratio <= 1, "train.schedule.end_lr_ratio", "must be in [0, 1]")

  c = t.checkpoint
  _check(_is_int(c.every) and c.every >= 1, "train.checkpoint.every", "must be an int >= 1")
  _check(_is_int(c.keep) and c.keep >= 1, "train.checkpoint.keep", "must be an int >= 1")
  _check(t.peak_flops >= 0, "train.peak_flops", "must be >= 0 (0: look up the device)")
  _check(t.platform in PLATFORMS, "train.platform",
         f"must be one of {PLATFORMS}, got {t.platform!r}")
  _check(t.transfer_guard in ("allow", "log", "disallow"), "train.transfer_guard",
         f"must be 'allow', 'log' or 'disallow', got {t.transfer_guard!r}")
  _check(_is_int(t.prefetch) and t.prefetch >= 0, "train.prefetch",
         f"must be an int >= 0 (0: build each batch inline), got {t.prefetch!r}")
  _check(isinstance(t.compilation_cache_dir, str), "train.compilation_cache_dir",
         f"must be a path, a gs:// URL, '' (default) or 'off', got {t.compilation_cache_dir!r}")
  _check(isinstance(t.sync_loop, bool), "train.sync_loop",
         f"must be True or False, got {t.sync_loop!r}")
  validate_hard_negatives(config)


def validate_hard_negatives(config: ml_collections.ConfigDict) -> None:
  h = config.train.hard_negatives
  key = "train.hard_negatives"
  _check(isinstance(h.enabled, bool), f"{key}.enabled", f"must be True or False, got {h.enabled!r}")
  for name in ("every_steps", "per_trigger"):
    _check(_is_int(h[name]) and h[name] >= 1, f"{key}.{name}",
           f"must be an int >= 1, got {h[name]!r}")
  _in_unit(h.max_cost_fraction, f"{key}.max_cost_fraction")
  if h.enabled and "data" in config:
    workers = config.data.pipeline.worker_count
    _check(workers == 0, "data.pipeline.worker_count",
           f"must be 0 while train.hard_negatives.enabled (the mined table lives in the "
           f"main process), got {workers!r}")
