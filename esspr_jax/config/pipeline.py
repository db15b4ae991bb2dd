"""Config section `data.pipeline`: building pair datasets (TFDS) and streaming them (Grain).

`build.*` is read once, when a pairs CSV + image dir is built into array_record;
the rest is read by the Grain loaders. Image size and title length are not here:
they come from `config.model.image.size` and `config.model.tokenizer.max_len`, so the
model and its input can never disagree.
"""
import re

import ml_collections

from esspr_jax.config.checks import check as _check
from esspr_jax.config.checks import is_int as _is_int
from esspr_jax.config.checks import is_number as _is_number
from esspr_jax.config.constants import RESIZE_MODES

DATASET_NAME = re.compile(r"[a-z][a-z0-9_]*")

_PER_PRESET = {
    # worker processes, reader threads per process, long side stored at build time
    "tiny": dict(worker_count=0, read_threads=1, max_image_side=64),
    "demo": dict(worker_count=1, read_threads=2, max_image_side=128),
    "base": dict(worker_count=8, read_threads=4, max_image_side=384),
    "large": dict(worker_count=16, read_threads=4, max_image_side=512),
}


def default_config(preset: str) -> ml_collections.ConfigDict:
  p = _PER_PRESET[preset]
  c = ml_collections.ConfigDict()
  c.data_dir = ""  # TFDS data dir; "" = <workdir>/tfds
  c.train_dataset = "train_pairs"  # dataset (builder config) names under data_dir
  c.eval_dataset = "eval_pairs"
  # Modification triplets in the pairs format, read while loss.composed.weight > 0.
  c.composed_dataset = "composed_pairs"
  c.shuffle_seed = 0  # global shuffle + per-example augmentation seed; epochs reshuffle
  c.worker_count = p["worker_count"]  # Grain worker processes; 0 = in the main process
  c.worker_buffer_size = 2  # batches each worker prepares ahead
  c.read_threads = p["read_threads"]  # threads per process decoding examples
  c.prefetch = 4  # batches buffered ahead by the reader threads
  c.resize_mode = "pad"  # eval resize: 'pad' (whole product), 'crop' (centre), 'squash'

  c.augment = ml_collections.ConfigDict()
  c.augment.enabled = True  # train loader only; eval never augments
  c.augment.crop_scale = (0.6, 1.0)  # random resized crop: area fraction kept
  c.augment.crop_ratio = (3 / 4, 4 / 3)  # ... and aspect ratio range
  c.augment.flip_prob = 0.5
  c.augment.brightness = 0.2  # jitter factor drawn in [1-s, 1+s]; 0 disables
  c.augment.contrast = 0.2
  c.augment.saturation = 0.2

  c.build = ml_collections.ConfigDict()
  c.build.strict = False  # True: the first bad row raises, naming file and row
  c.build.max_bad_fraction = 0.1  # more bad rows than this stops the build
  c.build.max_image_side = p["max_image_side"]  # stored images are shrunk to this; 0 keeps size
  c.build.min_image_side = 8  # smaller images (tracking pixels, icons) are skipped
  c.build.jpeg_quality = 90  # for images that are re-encoded
  c.build.positives_only = True  # drop label-0 rows (counted, not "bad")
  c.build.beam_runner = ""  # "" builds in-process; e.g. "DirectRunner", "DataflowRunner"
  c.build.beam_options = ""  # Beam pipeline flags, space-separated
  return c




def _check_range(pair, key: str, lo: float, hi: float) -> None:
  _check(isinstance(pair, (tuple, list)) and len(pair) == 2 and all(map(_is_number, pair)),
         key, f"must be a (low, high) pair of numbers, got {pair!r}")
  _check(lo < pair[0] <= pair[1] <= hi, key, f"needs {lo} < low <= high <= {hi}, got {pair!r}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `config.data.pipeline` and the model keys it reads."""
  data = config.get("data") or {}
  c = data.get("pipeline") if hasattr(data, "get") else None
  _check(c is not None, "data.pipeline", "section missing")
  k = "data.pipeline."
  _check(isinstance(c.data_dir, str), k + "data_dir", "must be a string path ('' = <workdir>/tfds)")
  _check(isinstance(c.get("composed_dataset", ""), str), k + "composed_dataset",
         "must be a dataset name ('' = none)")
  for name in ("train_dataset", "eval_dataset") + (("composed_dataset",) if c.get(
      "composed_dataset") else ()):
    value = c[name]
    _check(isinstance(value, str) and DATASET_NAME.fullmatch(value) is not None, k + name,
           f"must be lower_snake_case (a TFDS config name), got {value!r}")
  _check(_is_int(c.shuffle_seed) and 0 <= c.shuffle_seed < 2**32, k + "shuffle_seed",
         f"must be an int in [0, 2**32), got {c.shuffle_seed!r}")
  for name in ("worker_count", "read_threads", "prefetch", "worker_buffer_size"):
    _check(_is_int(c[name]) and c[name] >= 0, k + name, f"must be an int >= 0, got {c[name]!r}")
  _check(c.read_threads >= 1, k + "read_threads", "must be >= 1")
  _check(c.worker_buffer_size >= 1, k + "worker_buffer_size", "must be >= 1")
  _check(c.resize_mode in RESIZE_MODES, k + "resize_mode",
         f"must be one of {RESIZE_MODES}, got {c.resize_mode!r}")

  a = c.augment
  _check(isinstance(a.enabled, bool), k + "augment.enabled", "must be a bool")
  _check_range(a.crop_scale, k + "augment.crop_scale", 0.0, 1.0)
  _check_range(a.crop_ratio, k + "augment.crop_ratio", 0.0, float("inf"))
  _check(_is_number(a.flip_prob) and 0 <= a.flip_prob <= 1, k + "augment.flip_prob",
         f"must be in [0, 1], got {a.flip_prob!r}")
  for name in ("brightness", "contrast", "saturation"):
    _check(_is_number(a[name]) and 0 <= a[name] < 1, k + "augment." + name,
           f"must be in [0, 1), got {a[name]!r}")

  b = c.build
  _check(isinstance(b.strict, bool), k + "build.strict", "must be a bool")
  _check(_is_number(b.max_bad_fraction) and 0 <= b.max_bad_fraction <= 1,
         k + "build.max_bad_fraction", f"must be in [0, 1], got {b.max_bad_fraction!r}")
  _check(_is_int(b.max_image_side) and b.max_image_side >= 0, k + "build.max_image_side",
         f"must be an int >= 0 (0 keeps the original size), got {b.max_image_side!r}")
  _check(_is_int(b.min_image_side) and b.min_image_side >= 1, k + "build.min_image_side",
         f"must be an int >= 1, got {b.min_image_side!r}")
  _check(not b.max_image_side or b.max_image_side >= b.min_image_side, k + "build.max_image_side",
         f"must be >= build.min_image_side ({b.min_image_side})")
  _check(_is_int(b.jpeg_quality) and 1 <= b.jpeg_quality <= 95, k + "build.jpeg_quality",
         f"must be an int in [1, 95], got {b.jpeg_quality!r}")
  _check(isinstance(b.positives_only, bool), k + "build.positives_only", "must be a bool")
  _check(isinstance(b.beam_runner, str), k + "build.beam_runner",
         "must be a Beam runner name, or '' to build in-process")
  _check(isinstance(b.beam_options, str), k + "build.beam_options",
         "must be a string of space-separated Beam pipeline flags")

  # Keys owned by the model section, read here defensively (it may not define them yet).
  model = config.get("model") or {}
  image = model.get("image") if hasattr(model, "get") else None
  if image is not None and image.get("size") is not None:
    _check(_is_int(image.size) and image.size >= 8, "model.image.size",
           f"must be an int >= 8 (pixels), got {image.size!r}")
  tok = model.get("tokenizer") if hasattr(model, "get") else None
  if tok is not None and tok.get("max_len") is not None:
    _check(_is_int(tok.max_len) and tok.max_len >= 2, "model.tokenizer.max_len",
           f"must be an int >= 2, got {tok.max_len!r}")
