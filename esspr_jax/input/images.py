"""Product images: validation at dataset-build time, decode/resize/augment at load time.

Build time (`prepare_for_dataset`): every image is fully decoded once, so corrupt,
truncated, missing or absurd files are caught then (as a `BadImage` with a reason the
builder counts), never halfway through training. What is stored is always an RGB JPEG
no larger than `max_side`, so later decoding is uniform and fast.

Load time: `decode_rgb` (JPEG draft mode decodes straight at a reduced scale),
`fit_square` for eval and `augment` for training (random resized crop, horizontal
flip, colour jitter). The augmentation is a pure function of the image and a NumPy
generator; Grain seeds that generator per example, so a run is reproducible.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import pathlib
import stat
import urllib.parse
import warnings

import numpy as np
from PIL import Image, ImageOps

from esspr_jax.config.constants import RESIZE_MODES

_PAD_FILL = (255, 255, 255)  # product photos are mostly shot on white
_RESAMPLE = Image.Resampling.BILINEAR
# Largest image file any reader opens (build, export, search queries): judged from the
# file's size before a byte is read, so a huge or sparse "jpg" costs nothing. Fetched
# images have their own cap (data.fetch.max_bytes). Pixels are capped by Pillow's
# Image.MAX_IMAGE_PIXELS (about 89 Mpx): a larger picture is image_too_large.
MAX_IMAGE_BYTES = 64 * 1024 * 1024


class BadImage(Exception):
  """An image that cannot be used; `reason` is the skip-counter key."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


def resolve_image_path(image_dir: str | pathlib.Path, ref: str) -> pathlib.Path:
  """Where the file for a row's image reference lives.

  A relative path is taken under `image_dir`. A URL (the public release lists image
  URLs) maps to the URL's last path segment under `image_dir`: download the images
  there first (docs/dataset.md). Absolute paths, `..` escapes and symlinks that lead
  out of `image_dir` are refused (bad_image_path) so a pair file cannot read arbitrary
  files.
  """
  ref = ref.strip()
  if not ref:
    raise BadImage("missing_image", "empty image reference")
  if "://" in ref:
    name = pathlib.PurePosixPath(urllib.parse.urlparse(ref).path).name
    if not name:
      raise BadImage("missing_image", f"URL without a file name: {ref}")
    ref = urllib.parse.unquote(name)
  rel = pathlib.PurePath(ref)
  if rel.is_absolute() or ".." in rel.parts:
    raise BadImage("bad_image_path", f"image path must be relative to the image dir: {ref}")
  path = pathlib.Path(image_dir) / rel
  root = os.path.realpath(image_dir)
  real = os.path.realpath(path)  # every symlink on the way followed
  if os.path.commonpath([root, real]) != root:
    raise BadImage("bad_image_path", f"{path} leads out of the image dir {image_dir} (to "
                   f"{real}): a symlink; link only to files inside it")
  return path


def read_regular_file(path: str | pathlib.Path, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
  """The bytes of `path` if it is a regular file of at most `max_bytes`. A FIFO, device,
  socket or directory is refused as bad_image_path without reading (a FIFO would block
  forever, /dev/zero never ends); a larger file as image_too_large, judged by its size
  before reading. The file is opened non-blocking and checked on the open descriptor, so
  a swap after a check cannot slip one through; a file growing meanwhile is cut off at
  the cap too."""
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
  except (FileNotFoundError, NotADirectoryError):
    raise BadImage("missing_image", f"{path}: no such file") from None
  except OSError as e:
    raise BadImage("missing_image", f"{path}: {e.strerror or e}") from None
  try:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
      kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
              else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
              "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
      raise BadImage("bad_image_path", f"{path} is {kind}, not an image file")
    size = os.fstat(fd).st_size
    if size > max_bytes:
      raise _too_many_bytes(path, size, max_bytes)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb", closefd=False) as f:
      data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
      raise _too_many_bytes(path, len(data), max_bytes)
    return data
  except OSError as e:
    raise BadImage("missing_image", f"{path}: {e.strerror or e}") from None
  finally:
    os.close(fd)


def _too_many_bytes(path, size: int, max_bytes: int) -> BadImage:
  return BadImage("image_too_large", f"{path}: {size:,} bytes > {max_bytes:,} "
                  "(images.MAX_IMAGE_BYTES)")


def open_fully(data: bytes, name: str) -> Image.Image:
  """Opens and decodes every pixel, mapping Pillow's failure kinds to skip reasons; a
  picture over Image.MAX_IMAGE_PIXELS is image_too_large before it is decoded."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
      img.load()
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise BadImage("image_too_large", f"{name}: too many pixels: {e}") from None
  except Image.UnidentifiedImageError:
    raise BadImage("corrupt_image", f"{name}: not a readable image") from None
  except OSError as e:
    reason = "truncated_image" if "truncated" in str(e).lower() else "corrupt_image"
    raise BadImage(reason, f"{name}: {e}") from None
  except (SyntaxError, ValueError, EOFError, IndexError) as e:  # Pillow's other parse errors
    raise BadImage("corrupt_image", f"{name}: {e}") from None
  return img


def to_rgb(img: Image.Image) -> Image.Image:
  """RGB view of any Pillow mode; transparency is composited onto white."""
  if img.mode == "RGB":
    return img
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA", "PA"):
    rgba = img.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, _PAD_FILL)
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas
  if img.mode.startswith("I;16") or img.mode == "I":
    arr = np.asarray(img, dtype=np.float64)
    top = max(float(arr.max()), 1.0)
    img = Image.fromarray((arr * (255.0 / top)).astype(np.uint8), "L")
  return img.convert("RGB")


def prepare_for_dataset(path: str | pathlib.Path, max_side: int | None = 512,
                        min_side: int = 8, jpeg_quality: int = 90) -> bytes:
  """Validated RGB JPEG bytes of the image at `path`, at most `max_side` on its long side.

  A file that is already an upright RGB JPEG within `max_side` is stored byte for
  byte; anything else is converted once here. Raises BadImage with reason
  missing_image, bad_image_path (not a regular file), corrupt_image, truncated_image,
  image_too_large or image_too_small.
  """
  path = pathlib.Path(path)
  data = read_regular_file(path)
  if not data:
    raise BadImage("corrupt_image", f"{path}: empty file")
  img = open_fully(data, str(path))
  if min(img.size) < min_side:
    raise BadImage("image_too_small", f"{path}: {img.size[0]}x{img.size[1]} < {min_side} px")
  orientation = img.getexif().get(0x0112, 1)
  keep_bytes = (img.format == "JPEG" and img.mode == "RGB" and orientation == 1
                and (max_side is None or max(img.size) <= max_side))
  if keep_bytes:
    return data
  img = to_rgb(ImageOps.exif_transpose(img))
  if max_side is not None and max(img.size) > max_side:
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
  out = io.BytesIO()
  img.save(out, format="JPEG", quality=jpeg_quality)
  return out.getvalue()


def decode_rgb(data: bytes, target: int | None = None) -> Image.Image:
  """Decodes stored image bytes to RGB; JPEGs decode at the smallest scale >= `target`."""
  img = Image.open(io.BytesIO(data))
  if target and img.format == "JPEG":
    img.draft("RGB", (target, target))
  return to_rgb(img)


def fit_square(img: Image.Image, size: int, mode: str = "pad") -> np.ndarray:
  """uint8[size,size,3] for eval: 'pad' keeps the whole product (white borders),
  'crop' takes the centre square, 'squash' ignores the aspect ratio."""
  w, h = img.size
  if mode == "squash" or w == h:
    out = img.resize((size, size), _RESAMPLE)
  elif mode == "crop":
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    out = img.resize((size, size), _RESAMPLE, box=(left, top, left + side, top + side))
  elif mode == "pad":
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = Image.new("RGB", (size, size), _PAD_FILL)
    out.paste(img.resize((nw, nh), _RESAMPLE), ((size - nw) // 2, (size - nh) // 2))
  else:
    raise ValueError(f"unknown resize mode {mode!r}; use one of {RESIZE_MODES}")
  return np.asarray(out, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """Train-time augmentation. Jitter strengths s draw a factor uniformly in [1-s, 1+s]."""
  crop_scale: tuple[float, float] = (0.6, 1.0)  # fraction of the image area kept
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of the crop
  flip_prob: float = 0.5
  brightness: float = 0.2
  contrast: float = 0.2
  saturation: float = 0.2


def random_crop_box(width: int, height: int, rng: np.random.Generator,
                    scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
  """A (left, top, right, bottom) box with area fraction in `scale`, aspect in `ratio`.

  Inception-style: up to 10 draws, then the largest centred box within `ratio`.
  """
  area = width * height
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = round(math.sqrt(target * aspect))
    h = round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, round(width / ratio[0])
  elif aspect > ratio[1]:
    w, h = round(height * ratio[1]), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


_GREY = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma weights


def color_jitter(pixels: np.ndarray, rng: np.random.Generator, brightness: float,
                 contrast: float, saturation: float) -> np.ndarray:
  """Brightness, contrast, saturation jitter on uint8[H,W,3], in that order
  (torchvision's definitions: scale; blend with the mean grey level; blend with the
  greyscale image), clipped once at the end.

  All three are linear in the pixel, so they compose into one 3x3 matrix and an
  offset: a single pass over the image instead of three.
  """
  if not (brightness or contrast or saturation):
    return pixels
  b = rng.uniform(1 - brightness, 1 + brightness) if brightness else 1.0
  c = rng.uniform(1 - contrast, 1 + contrast) if contrast else 1.0
  s = rng.uniform(1 - saturation, 1 + saturation) if saturation else 1.0
  x = pixels.reshape(-1, 3).astype(np.float32)
  # contrast blends towards the mean grey of the brightened image, b * mean(grey(x));
  # saturation maps grey g to s*g + (1-s)*g = g, so that offset passes through unchanged.
  offset = (1 - c) * b * float((x @ _GREY).mean()) if contrast else 0.0
  matrix = b * c * (s * np.eye(3, dtype=np.float32) + (1 - s) * _GREY[:, None])
  out = x @ matrix.astype(np.float32) + np.float32(offset)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(pixels.shape)


def augment(img: Image.Image, size: int, rng: np.random.Generator,
            params: AugmentParams) -> np.ndarray:
  """uint8[size,size,3]: random resized crop, then flip, then colour jitter."""
  box = random_crop_box(img.size[0], img.size[1], rng, params.crop_scale, params.crop_ratio)
  out = img.resize((size, size), _RESAMPLE, box=box)
  if rng.uniform() < params.flip_prob:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  pixels = np.asarray(out, dtype=np.uint8)
  return color_jitter(pixels, rng, params.brightness, params.contrast, params.saturation)
