"""Pillow drawings of demo-world listings: one product, one supplier photo.

`render_listing` draws the product from its visible attributes, then applies what makes
two suppliers' photos of the same product differ: pose (rotation, scale, offset),
background, lighting, sensor noise and an occasional watermark. Drawing happens at twice
the output size and is box-downsampled, for cheap anti-aliasing. Everything random comes
from the `rng` passed in, so a seed reproduces the image bit for bit.
"""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from esspr_jax.demo_world.world_vocab import COLOURS

_SUPERSAMPLE = 2
_METAL = {"stainless": (176, 180, 186), "zinc": (205, 188, 112), "black": (58, 58, 64)}
# Pose jitter per renderer: max rotation in degrees. Small parts are photographed loosely.
_MAX_ROTATION = {"screw": 35.0, "bearing": 20.0, "resistor": 30.0, "capacitor": 12.0}


def _shade(rgb, factor):
  return tuple(int(max(0, min(255, c * factor))) for c in rgb)


def _contrast_colour(rgb):
  luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
  return (250, 250, 245) if luma < 150 else (45, 40, 50)


def pattern_fill(size: int, base: tuple, pattern: str, rng: np.random.Generator) -> Image.Image:
  """A size x size RGB swatch of `pattern` on `base`, at a slightly jittered period."""
  img = Image.new("RGB", (size, size), base)
  if pattern == "plain":
    return img
  ink = _contrast_colour(base)
  d = ImageDraw.Draw(img)
  period = max(6, int(size * rng.uniform(0.09, 0.12)))
  phase = int(rng.integers(0, period))
  if pattern == "stripes":
    for y in range(-period + phase, size, period):
      d.rectangle([0, y, size, y + period // 2 - 1], fill=ink)
  elif pattern == "dots":
    r = max(2, period // 4)
    for row, y in enumerate(range(-period + phase, size + period, period)):
      off = period // 2 if row % 2 else 0
      for x in range(-period + off, size + period, period):
        d.ellipse([x - r, y - r, x + r, y + r], fill=ink)
  elif pattern == "checks":
    for i, y in enumerate(range(-period + phase, size, period)):
      for j, x in enumerate(range(-period + phase, size, period)):
        if (i + j) % 2:
          d.rectangle([x, y, x + period - 1, y + period - 1], fill=ink)
  elif pattern == "zigzag":
    w = max(2, period // 4)
    for y in range(-period + phase, size + period, period):
      pts = [(x, y + (period // 3 if (x // (period // 2 or 1)) % 2 else 0))
             for x in range(0, size + period, max(1, period // 2))]
      d.line(pts, fill=ink, width=w)
  else:
    raise ValueError(f"unknown pattern {pattern!r}")
  return img


def _fill_mask(layer: Image.Image, mask: Image.Image, swatch: Image.Image) -> None:
  layer.paste(swatch, (0, 0), mask)


def _screw(S, a, rng):
  layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
  d = ImageDraw.Draw(layer)
  metal = _METAL[a["finish"]]
  cy, x0, x1, half = S // 2, int(S * 0.3), int(S * 0.86), int(S * 0.055)
  d.rounded_rectangle([int(S * 0.14), cy - int(S * 0.13), x0, cy + int(S * 0.13)],
                      radius=int(S * 0.04), fill=_shade(metal, 1.05))
  d.rectangle([int(S * 0.18), cy - int(S * 0.03), int(S * 0.26), cy + int(S * 0.03)],
              fill=_shade(metal, 0.55))
  d.rectangle([x0, cy - half, x1, cy + half], fill=metal)
  step = max(3, int(S * 0.025))
  for x in range(x0 + 2, x1, step):
    d.line([(x, cy - half), (x + step // 2, cy + half)], fill=_shade(metal, 0.65), width=1)
  d.line([(x0, cy - half // 2), (x1, cy - half // 2)], fill=_shade(metal, 1.25), width=1)
  d.polygon([(x1, cy - half), (x1 + int(S * 0.03), cy), (x1, cy + half)], fill=metal)
  return layer


def _bearing(S, a, rng):
  layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
  d = ImageDraw.Draw(layer)
  c, r = S // 2, int(S * 0.36)
  steel = (190, 192, 198)
  d.ellipse([c - r, c - r, c + r, c + r], fill=steel, outline=_shade(steel, 0.6), width=2)
  face = (168, 170, 176) if a["seal"] == "ZZ" else (34, 34, 38)
  rf = int(r * 0.86)
  d.ellipse([c - rf, c - rf, c + rf, c + rf], fill=face)
  if a["seal"] == "ZZ":
    ri = int(r * 0.62)
    d.ellipse([c - ri, c - ri, c + ri, c + ri], outline=_shade(face, 0.7), width=2)
  rin = int(r * 0.5)
  d.ellipse([c - rin, c - rin, c + rin, c + rin], fill=steel)
  rb = int(r * 0.3)
  d.ellipse([c - rb, c - rb, c + rb, c + rb], fill=(0, 0, 0, 0))
  return layer


def _resistor(S, a, rng):
  layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
  d = ImageDraw.Draw(layer)
  cy = S // 2
  d.line([(int(S * 0.06), cy), (int(S * 0.94), cy)], fill=(150, 150, 155), width=max(2, S // 60))
  body = (222, 196, 150) if a["body"] == "carbon film" else (110, 160, 210)
  x0, x1, h = int(S * 0.3), int(S * 0.7), int(S * 0.09)
  d.rounded_rectangle([x0, cy - h, x1, cy + h], radius=h, fill=body)
  # Stock photo: the same generic bands on every style, as on most supplier pictures.
  for k, colour in enumerate(((120, 70, 30), (20, 20, 20), (230, 120, 20), (200, 170, 60))):
    x = x0 + int((x1 - x0) * (0.18 + 0.18 * k))
    d.rectangle([x, cy - h, x + max(2, S // 50), cy + h], fill=colour)
  return layer


def _capacitor(S, a, rng):
  layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
  d = ImageDraw.Draw(layer)
  cx, w = S // 2, int(S * 0.2)
  top, bottom = int(S * 0.16), int(S * 0.7)
  for dx in (-w // 2, w // 2):
    d.line([(cx + dx, bottom), (cx + dx, int(S * 0.92))], fill=(160, 160, 165), width=max(2, S // 70))
  sleeve = (28, 28, 32) if a["sleeve"] == "black" else (40, 70, 170)
  d.rounded_rectangle([cx - w, top, cx + w, bottom], radius=int(w * 0.3), fill=sleeve)
  d.rectangle([cx + w // 3, top + 4, cx + w - 4, bottom - 4], fill=_shade(sleeve, 2.6))
  d.ellipse([cx - w, top - w // 4, cx + w, top + w // 4], fill=(185, 185, 190))
  d.line([(cx - w // 2, top), (cx + w // 2, top)], fill=(120, 120, 125), width=1)
  d.line([(cx, top - w // 6), (cx, top + w // 6)], fill=(120, 120, 125), width=1)
  return layer


def _mug(S, a, rng):
  layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
  mask = Image.new("L", (S, S), 0)
  m = ImageDraw.Draw(mask)
  base = COLOURS[a["colour"]]
  shape = a["shape"]
  cx = int(S * 0.45)
  if shape == "classic":
    box = (cx - int(S * 0.22), int(S * 0.25), cx + int(S * 0.22), int(S * 0.78))
    m.rectangle(box, fill=255)
  elif shape == "tall":
    box = (cx - int(S * 0.16), int(S * 0.12), cx + int(S * 0.16), int(S * 0.86))
    m.rectangle(box, fill=255)
  elif shape == "tapered":
    box = (cx - int(S * 0.28), int(S * 0.24), cx + int(S * 0.28), int(S * 0.78))
    m.polygon([(box[0], box[1]), (box[2], box[1]), (cx + int(S * 0.14), box[3]),
               (cx - int(S * 0.14), box[3])], fill=255)
  elif shape == "barrel":
    box = (cx - int(S * 0.25), int(S * 0.24), cx + int(S * 0.25), int(S * 0.8))
    m.ellipse(box, fill=255)
    m.rectangle((box[0] + int(S * 0.06), box[1], box[2] - int(S * 0.06), box[1] + int(S * 0.1)),
                fill=255)
  elif shape == "espresso":
    box = (cx - int(S * 0.15), int(S * 0.45), cx + int(S * 0.15), int(S * 0.74))
    m.rounded_rectangle(box, radius=int(S * 0.05), fill=255)
  else:
    raise ValueError(f"unknown mug shape {shape!r}")
  d = ImageDraw.Draw(layer)
  hh = (box[3] - box[1]) * 0.5
  hy = (box[1] + box[3]) / 2
  right = box[2] - (int(S * 0.1) if shape == "tapered" else 0)
  d.ellipse([right - int(S * 0.05), hy - hh * 0.6, right + int(S * 0.15), hy + hh * 0.6],
            outline=_shade(base, 0.85), width=max(3, S // 22))
  _fill_mask(layer, mask, pattern_fill(S, base, a["pattern"], rng))
  d.ellipse([box[0], box[1] - int(S * 0.025), box[2] if shape != "tapered" else box[2],
             box[1] + int(S * 0.025)], fill=_shade(base, 0.6))
  return layer


def _cushion(S, a, rng):
  layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
  mask = Image.new("L", (S, S), 0)
  m = ImageDraw.Draw(mask)
  base = COLOURS[a["colour"]]
  c = S // 2
  if a["shape"] == "square":
    box = [c - int(S * 0.32), c - int(S * 0.32), c + int(S * 0.32), c + int(S * 0.32)]
    m.rounded_rectangle(box, radius=int(S * 0.08), fill=255)
  elif a["shape"] == "round":
    box = [c - int(S * 0.33), c - int(S * 0.33), c + int(S * 0.33), c + int(S * 0.33)]
    m.ellipse(box, fill=255)
  elif a["shape"] == "lumbar":
    box = [c - int(S * 0.4), c - int(S * 0.2), c + int(S * 0.4), c + int(S * 0.2)]
    m.rounded_rectangle(box, radius=int(S * 0.07), fill=255)
  else:
    raise ValueError(f"unknown cushion shape {a['shape']!r}")
  _fill_mask(layer, mask, pattern_fill(S, base, a["pattern"], rng))
  edge = mask.filter(ImageFilter.FIND_EDGES)
  layer.paste(Image.new("RGB", (S, S), _shade(base, 0.65)), (0, 0), edge)
  return layer


def _dress(S, a, rng):
  layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
  mask = Image.new("L", (S, S), 0)
  m = ImageDraw.Draw(mask)
  c = S // 2
  f = lambda x, y: (c + int(S * x), int(S * y))  # noqa: E731
  bodice = [f(-0.12, 0.12), f(-0.06, 0.1), f(0.0, 0.16), f(0.06, 0.1), f(0.12, 0.12),
            f(0.1, 0.4), f(-0.1, 0.4)]
  skirts = {
      "a-line": [f(-0.1, 0.4), f(0.1, 0.4), f(0.28, 0.8), f(-0.28, 0.8)],
      "bodycon": [f(-0.1, 0.4), f(0.1, 0.4), f(0.11, 0.78), f(-0.11, 0.78)],
      "maxi": [f(-0.1, 0.4), f(0.1, 0.4), f(0.24, 0.95), f(-0.24, 0.95)],
      "shift": [f(-0.12, 0.12), f(0.12, 0.12), f(0.16, 0.72), f(-0.16, 0.72)],
      "flare": [f(-0.1, 0.4), f(0.1, 0.4), f(0.36, 0.64), f(-0.36, 0.64)],
  }
  if a["cut"] not in skirts:
    raise ValueError(f"unknown dress cut {a['cut']!r}")
  m.polygon(bodice, fill=255)
  m.polygon(skirts[a["cut"]], fill=255)
  _fill_mask(layer, mask, pattern_fill(S, COLOURS[a["colour"]], a["pattern"], rng))
  return layer


def _tshirt(S, a, rng):
  layer = Image.new("RGBA", (S, S), (0, 0, 0, 0))
  mask = Image.new("L", (S, S), 0)
  m = ImageDraw.Draw(mask)
  c = S // 2
  f = lambda x, y: (c + int(S * x), int(S * y))  # noqa: E731
  m.polygon([f(-0.22, 0.2), f(0.22, 0.2), f(0.22, 0.85), f(-0.22, 0.85)], fill=255)
  if a["sleeve"] == "short":
    m.polygon([f(-0.22, 0.2), f(-0.38, 0.34), f(-0.3, 0.44), f(-0.22, 0.38)], fill=255)
    m.polygon([f(0.22, 0.2), f(0.38, 0.34), f(0.3, 0.44), f(0.22, 0.38)], fill=255)
  else:
    m.polygon([f(-0.22, 0.2), f(-0.4, 0.78), f(-0.31, 0.8), f(-0.2, 0.42)], fill=255)
    m.polygon([f(0.22, 0.2), f(0.4, 0.78), f(0.31, 0.8), f(0.2, 0.42)], fill=255)
  if a["neck"] == "crew":
    m.ellipse([c - int(S * 0.08), int(S * 0.14), c + int(S * 0.08), int(S * 0.27)], fill=0)
  else:
    m.polygon([f(-0.09, 0.19), f(0.09, 0.19), f(0.0, 0.36)], fill=0)
  _fill_mask(layer, mask, pattern_fill(S, COLOURS[a["colour"]], a["pattern"], rng))
  return layer


RENDERERS = {"screw": _screw, "bearing": _bearing, "resistor": _resistor,
             "capacitor": _capacitor, "mug": _mug, "cushion": _cushion, "dress": _dress,
             "tshirt": _tshirt}


def _background(S, rng):
  top = rng.uniform(205, 255, size=3)
  bottom = np.clip(top - rng.uniform(0, 45), 150, 255)
  t = np.linspace(0.0, 1.0, S, dtype=np.float32)[:, None, None]
  arr = top[None, None, :] * (1 - t) + bottom[None, None, :] * t
  return np.broadcast_to(arr, (S, S, 3)).astype(np.uint8)


def _font(px: int):
  return ImageFont.load_default(size=max(6, px))


def _pose(obj: Image.Image, angle_deg: float, scale: float, shift: tuple) -> Image.Image:
  """Rotates by angle, scales and shifts about the centre, in one bilinear resampling."""
  S = obj.size[0]
  c = (S - 1) / 2
  a = math.radians(angle_deg)
  cos, sin = math.cos(a) / scale, math.sin(a) / scale
  # Inverse map: output pixel (x, y) -> input pixel.
  ox, oy = c + shift[0], c + shift[1]
  matrix = (cos, sin, c - cos * ox - sin * oy, -sin, cos, c + sin * ox - cos * oy)
  return obj.transform((S, S), Image.AFFINE, matrix, resample=Image.BILINEAR)


def render_listing(renderer: str, attributes: dict, size: int, rng: np.random.Generator,
                   watermark: str | None = None) -> Image.Image:
  """One supplier photo (RGB, size x size) of a product with these attributes."""
  S = size * _SUPERSAMPLE
  obj = RENDERERS[renderer](S, attributes, rng)
  angle = rng.uniform(-1, 1) * _MAX_ROTATION.get(renderer, 8.0)
  scale = rng.uniform(0.78, 1.05)
  shift = (rng.uniform(-0.08, 0.08) * S, rng.uniform(-0.08, 0.08) * S)
  obj = _pose(obj, angle, scale, shift)
  canvas = Image.fromarray(_background(S, rng))
  shadow_alpha = obj.getchannel("A").point(lambda v: v * 0.35).filter(
      ImageFilter.BoxBlur(max(1, S // 40)))
  drop = max(1, S // 40)
  canvas.paste((60, 60, 60), (drop, drop), shadow_alpha)
  canvas.paste(obj, (0, 0), obj)
  if watermark:
    mark = Image.new("RGBA", (S, S), (0, 0, 0, 0))
    md = ImageDraw.Draw(mark)
    pos = (int(rng.uniform(0.02, 0.4) * S), int(rng.choice([0.04, 0.8]) * S))
    md.text(pos, watermark, font=_font(int(S * 0.1)), fill=(90, 90, 90, int(rng.integers(90, 170))))
    canvas.paste(mark, (0, 0), mark)
  # Lighting and sensor noise at the output size: cheaper, and noise is per output pixel.
  arr = np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32)
  n = arr.shape[0]
  gain = (rng.uniform(0.85, 1.12) * rng.uniform(0.95, 1.05, size=3)).astype(np.float32)
  theta = rng.uniform(0, 2 * math.pi)
  axis = np.linspace(-1, 1, n, dtype=np.float32)
  ramp = (np.float32(np.cos(theta)) * axis[None, :] + np.float32(np.sin(theta)) * axis[:, None])
  ramp *= np.float32(rng.uniform(0, 18))
  arr = arr * gain + ramp[:, :, None] + rng.standard_normal(arr.shape, dtype=np.float32) * 3.0
  return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
