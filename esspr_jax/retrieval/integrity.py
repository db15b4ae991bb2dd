"""What an export directory may hold, and proof that its files are the ones written.

Opening an export must never run code from it. The project stores nothing executable
(ids are .npy read with allow_pickle=False, metadata Parquet, config JSON, ScaNN's
own protobuf + .npy assets loaded without its pickled doc ids), and the manifest lists
the sha256 of every file it wrote. Before anything is read:

    check_layout(export_dir, assets)   # refuses a .pkl anywhere, a symlink, or any file
                                       # the manifest does not list (a planted extra)
    verify(export_dir, assets, names)  # sha256 of the files about to be loaded

Both raise `ExportRefused` (a DataError: the command exits 2 with its message).
"""
import hashlib
import os
import pathlib
from typing import Iterable, Mapping

from esspr_jax.errors import DataError

MANIFEST = "manifest.json"
FORBIDDEN_SUFFIXES = (".pkl", ".pickle", ".pckl", ".dill", ".joblib")


class ExportRefused(DataError):
  """An export holds something it should not, or a file differs from its manifest."""


def sha256_file(path, block: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(block):
      h.update(chunk)
  return h.hexdigest()


def list_files(root) -> list[str]:
  """Every entry under `root` as a relative POSIX path (directories excluded)."""
  root = pathlib.Path(root)
  out = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
    base = pathlib.Path(dirpath)
    for d in dirnames:
      if (base / d).is_symlink():
        out.append((base / d).relative_to(root).as_posix())
    for f in filenames:
      out.append((base / f).relative_to(root).as_posix())
  return sorted(out)


def hash_assets(root, names: Iterable[str]) -> dict[str, str]:
  """{relative path: sha256} for the manifest."""
  root = pathlib.Path(root)
  return {n: sha256_file(root / n) for n in sorted(set(names))}


def check_layout(root, assets: Mapping[str, str]) -> None:
  """Refuses pickles, symlinks and files the manifest does not list (see module doc)."""
  root = pathlib.Path(root)
  files = list_files(root)
  pickles = [f for f in files if f.lower().endswith(FORBIDDEN_SUFFIXES)]
  if pickles:
    raise ExportRefused(f"refusing export {root}: it holds pickle files {pickles[:5]}, which "
                        f"loading would execute; this project never writes them (re-export)")
  links = [f for f in files if (root / f).is_symlink()]
  if links:
    raise ExportRefused(f"refusing export {root}: it holds symlinks {links[:5]}")
  unknown = [f for f in files if f != MANIFEST and f not in assets]
  if unknown:
    raise ExportRefused(f"refusing export {root}: files not in its manifest {unknown[:5]}"
                        f"{' ...' if len(unknown) > 5 else ''} (an interrupted update leaves "
                        f"some: rerun the export / update; otherwise delete them)")
  missing = [f for f in assets if not (root / f).is_file()]
  if missing:
    raise ExportRefused(f"refusing export {root}: manifest lists missing files {missing[:5]}")


def verify(root, assets: Mapping[str, str], names: Iterable[str]) -> None:
  """Checks the sha256 of `names` (files or directory prefixes) against the manifest."""
  root = pathlib.Path(root)
  for name in names:
    chosen = [a for a in assets if a == name or a.startswith(name.rstrip("/") + "/")]
    if not chosen:
      raise ExportRefused(f"refusing export {root}: {name} is not in its manifest")
    for a in chosen:
      if sha256_file(root / a) != assets[a]:
        raise ExportRefused(f"refusing export {root}: {a} differs from its manifest "
                            f"(sha256 mismatch): the file was changed after export")
