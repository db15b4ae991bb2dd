"""Image validation, resizing and augmentation (esspr_jax/input/images.py)."""
import io

import numpy as np
import pytest
from PIL import Image

from esspr_jax.input import images


def _jpeg(path, size=(40, 30), color=(200, 30, 30), quality=95) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="JPEG", quality=quality)
  path.write_bytes(buf.getvalue())
  return buf.getvalue()


def _noise_jpeg(path, size=(64, 64), seed=0) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, size[::-1] + (3,), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
  path.write_bytes(buf.getvalue())
  return buf.getvalue()


def test_small_rgb_jpeg_is_stored_byte_for_byte(tmp_path):
  data = _jpeg(tmp_path / "a.jpg")
  assert images.prepare_for_dataset(tmp_path / "a.jpg", max_side=64) == data


def test_large_image_is_shrunk_to_max_side_keeping_aspect(tmp_path):
  _jpeg(tmp_path / "big.jpg", size=(400, 200))
  out = Image.open(io.BytesIO(images.prepare_for_dataset(tmp_path / "big.jpg", max_side=100)))
  assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (100, 50))


def test_transparent_png_becomes_rgb_jpeg_on_white(tmp_path):
  rgba = Image.new("RGBA", (64, 64), (0, 0, 255, 0))
  rgba.paste((0, 0, 255, 255), (24, 24, 40, 40))
  rgba.save(tmp_path / "t.png")
  out = Image.open(io.BytesIO(images.prepare_for_dataset(tmp_path / "t.png")))
  assert (out.format, out.mode) == ("JPEG", "RGB")
  pixels = np.asarray(out).astype(int)
  assert np.all(np.abs(pixels[0, 0] - [255, 255, 255]) < 8)  # transparent -> white
  assert np.all(np.abs(pixels[32, 32] - [0, 0, 255]) < 8)  # opaque blue stays blue


@pytest.mark.parametrize("make, reason", [
    (lambda p: None, "missing_image"),
    (lambda p: p.write_bytes(b""), "corrupt_image"),
    (lambda p: p.write_bytes(b"<html>404 not found</html>" * 10), "corrupt_image"),
    (lambda p: p.write_bytes(_noise_jpeg(p)[:600]), "truncated_image"),
    (lambda p: _jpeg(p, size=(4, 40)), "image_too_small"),
])
def test_bad_images_raise_with_their_reason(tmp_path, make, reason):
  path = tmp_path / "x.jpg"
  make(path)
  with pytest.raises(images.BadImage) as info:
    images.prepare_for_dataset(path, min_side=8)
  assert info.value.reason == reason
  assert str(path) in info.value.detail


def test_image_references_resolve_under_the_image_dir(tmp_path):
  assert images.resolve_image_path(tmp_path, "a/b.jpg") == tmp_path / "a" / "b.jpg"
  url = "https://s.alicdn.com/@sc04/kf/H12%20ab.jpg?x=1"
  assert images.resolve_image_path(tmp_path, url) == tmp_path / "H12 ab.jpg"
  for bad in ("../etc/passwd", "/etc/passwd"):
    with pytest.raises(images.BadImage, match="relative"):
      images.resolve_image_path(tmp_path, bad)


def test_fit_square_modes_on_a_wide_image():
  img = Image.new("RGB", (60, 20), (255, 0, 0))
  img.paste((0, 255, 0), (0, 0, 10, 20))  # green left sixth
  padded = images.fit_square(img, 8, "pad")
  assert padded.shape == (8, 8, 3) and padded.dtype == np.uint8
  assert np.all(padded[:2] == 255) and np.all(padded[-2:] == 255)  # white bands top/bottom
  assert tuple(padded[4, 6]) == (255, 0, 0)
  cropped = images.fit_square(img, 8, "crop")  # centre 20x20: red only
  assert np.all(cropped == [255, 0, 0])
  squashed = images.fit_square(img, 8, "squash")  # whole width: green on the left
  assert squashed[4, 0, 1] > 200 and squashed[4, 0, 0] < 50 and tuple(squashed[4, 7]) == (255, 0, 0)
  with pytest.raises(ValueError, match="resize mode"):
    images.fit_square(img, 8, "stretch")


def test_random_crop_box_respects_scale_ratio_and_bounds():
  rng = np.random.default_rng(0)
  for _ in range(300):
    left, top, right, bottom = images.random_crop_box(120, 80, rng, (0.3, 0.9), (0.75, 1.25))
    w, h = right - left, bottom - top
    assert 0 <= left < right <= 120 and 0 <= top < bottom <= 80
    assert 0.3 * 9600 * 0.95 <= w * h <= 0.9 * 9600 * 1.05
    assert 0.75 * 0.95 <= w / h <= 1.25 * 1.05


def test_random_crop_box_falls_back_to_centre_crop_within_ratio():
  # A 1000x10 strip can never hold a 0.5..1 area crop with aspect <= 2: fallback.
  box = images.random_crop_box(1000, 10, np.random.default_rng(0), (0.5, 1.0), (0.5, 2.0))
  assert box == (490, 0, 510, 10)


def _reference_jitter(pixels, b, c, s):
  """Independent per-step reference: scale, blend with mean grey, blend with grey."""
  weights = np.array([0.299, 0.587, 0.114])
  x = pixels.astype(np.float64) * b
  x = c * x + (1 - c) * (x @ weights).mean()
  x = s * x + (1 - s) * (x @ weights)[..., None]
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def test_color_jitter_matches_reference_formula():
  pixels = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
  draws = np.random.default_rng(7)
  b, c, s = (draws.uniform(1 - 0.3, 1 + 0.3), draws.uniform(1 - 0.4, 1 + 0.4),
             draws.uniform(1 - 0.5, 1 + 0.5))
  got = images.color_jitter(pixels, np.random.default_rng(7), 0.3, 0.4, 0.5)
  want = _reference_jitter(pixels, b, c, s)
  assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # float32 vs float64 rounding
  assert images.color_jitter(pixels, np.random.default_rng(7), 0, 0, 0) is pixels


def test_augment_is_deterministic_per_seed_and_flips():
  img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 30, 3), dtype=np.uint8))
  params = images.AugmentParams()
  a = images.augment(img, 16, np.random.default_rng(5), params)
  assert a.shape == (16, 16, 3) and a.dtype == np.uint8
  assert np.array_equal(a, images.augment(img, 16, np.random.default_rng(5), params))
  assert not np.array_equal(a, images.augment(img, 16, np.random.default_rng(6), params))
  mirror = images.AugmentParams(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=1.0,
                                brightness=0, contrast=0, saturation=0)
  flipped = images.augment(img, 16, np.random.default_rng(0), mirror)
  assert np.array_equal(flipped, images.fit_square(img, 16, "squash")[:, ::-1])


def test_decode_rgb_uses_jpeg_draft_but_keeps_enough_resolution(tmp_path):
  data = _jpeg(tmp_path / "big.jpg", size=(800, 800))
  img = images.decode_rgb(data, target=100)
  assert img.mode == "RGB" and 100 <= img.size[0] < 800  # decoded at a reduced scale
  assert images.decode_rgb(data).size == (800, 800)


# ------------------------------------------------------------------ paths that are not image files
def test_symlinks_out_of_the_image_dir_are_refused_and_inside_ones_work(tmp_path):
  images_dir, outside = tmp_path / "images", tmp_path / "secret"
  images_dir.mkdir()
  outside.mkdir()
  _jpeg(outside / "private.jpg")
  _jpeg(images_dir / "real.jpg")
  (images_dir / "leak.jpg").symlink_to(outside / "private.jpg")
  (images_dir / "sub").symlink_to(outside)  # a linked directory leads out too
  (images_dir / "alias.jpg").symlink_to(images_dir / "real.jpg")
  for ref in ("leak.jpg", "sub/private.jpg"):
    with pytest.raises(images.BadImage, match="leads out of the image dir") as info:
      images.resolve_image_path(images_dir, ref)
    assert info.value.reason == "bad_image_path"
  path = images.resolve_image_path(images_dir, "alias.jpg")
  assert images.prepare_for_dataset(path) == (images_dir / "real.jpg").read_bytes()


def _within(seconds, fn):
  """fn()'s exception, or AssertionError if it does not return within `seconds`."""
  import threading
  box = {}

  def run():
    try:
      fn()
    except BaseException as e:  # noqa: BLE001
      box["error"] = e
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  assert not thread.is_alive(), "hung (a FIFO read blocks until a writer comes)"
  return box.get("error")


def test_fifos_directories_and_devices_are_refused_without_reading(tmp_path):
  import os
  os.mkfifo(tmp_path / "pipe.jpg")
  (tmp_path / "dir.jpg").mkdir()
  made = ["pipe.jpg", "dir.jpg"]
  try:
    os.mknod(tmp_path / "null.jpg", 0o600 | __import__("stat").S_IFCHR, os.makedev(1, 3))
    made.append("null.jpg")
  except PermissionError:
    pass  # no CAP_MKNOD here: the FIFO and directory still cover the rule
  for name in made:
    error = _within(5, lambda: images.prepare_for_dataset(
        images.resolve_image_path(tmp_path, name)))
    assert isinstance(error, images.BadImage) and error.reason == "bad_image_path", (name, error)
    assert "not an image file" in error.detail


def test_files_over_the_byte_cap_are_refused_by_size_without_reading(tmp_path):
  """A sparse file one byte over the cap: refused from its size, before a byte is read."""
  import os
  huge = tmp_path / "huge.jpg"
  huge.touch()
  os.truncate(huge, images.MAX_IMAGE_BYTES + 1)
  error = _within(5, lambda: images.prepare_for_dataset(huge))
  assert isinstance(error, images.BadImage) and error.reason == "image_too_large", error
  assert f"{images.MAX_IMAGE_BYTES + 1:,} bytes" in error.detail
  at_cap = tmp_path / "at_cap.jpg"
  at_cap.touch()
  os.truncate(at_cap, images.MAX_IMAGE_BYTES)
  with pytest.raises(images.BadImage) as info:  # read: it is within the cap
    images.prepare_for_dataset(at_cap)
  assert info.value.reason == "corrupt_image"
