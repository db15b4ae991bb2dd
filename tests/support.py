"""Small helpers several test files share (not a test module).

Importable as `support` from any test (pytest puts tests/ on sys.path) and from the
worker scripts (they put their own folder there)."""
import argparse
import io
import os

from PIL import Image


def set_dotted(config, changes: dict):
  """Applies `{'section__key': value}` changes to a ConfigDict in place; returns it."""
  for dotted, value in changes.items():
    node = config
    *parents, leaf = dotted.split("__")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def write_jpeg(path, color, size=(20, 14)):
  """A one-colour JPEG at `path` (quality 95)."""
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
  path.write_bytes(buf.getvalue())


def socket_inodes(pid: int) -> set:
  """Inode numbers of the sockets process `pid` holds open (Linux /proc)."""
  inodes = set()
  try:
    fds = os.listdir(f"/proc/{pid}/fd")
  except OSError:
    return inodes
  for fd in fds:
    try:
      target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
      continue
    if target.startswith("socket:["):
      inodes.add(target[8:-1])
  return inodes


def worker_parser(default_steps: int) -> argparse.ArgumentParser:
  """The flags every trainer worker script takes: --workdir and --steps."""
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=default_steps)
  return parser
