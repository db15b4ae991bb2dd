"""TFDS builder for pairs in the eSSPR release format (CSV + image directory -> array_record).

One builder, `esspr_pairs`, serves every pair file the project meets: mined training
pairs, the demo eval set, the public eSSPR release and the 10-pair sample. Each
dataset is a builder config named by the user, stored at
`<data_dir>/esspr_pairs/<name>/<version>/`, one split `pairs` in CSV row order.

No TensorFlow is needed: images are handed to TFDS as validated JPEG bytes
(`images.prepare_for_dataset`), and readers get them back as bytes
(`open_pairs` skips TFDS's decoding; the Grain pipeline decodes with Pillow).

Bad rows never reach the dataset. They are counted by reason (the CSV reader's
reasons, plus missing/corrupt/truncated/too large/too small images, bad image paths
and duplicate pairs), logged, and stored with the dataset as its build report
(`metadata.json`, key `build_report`). `strict` raises on the first one, naming file
and row; more than `max_bad_fraction` bad rows stops the build (checked every
10,000 rows and at the end), and nothing half-built is left behind. Empty titles are
kept (the tokenizer flags them `text_empty`, the image still teaches) and counted;
a non-UTF-8 line is skipped. Duplicates are unordered: (a, b) and (b, a) are one
pair; the first good row wins. Label-0 rows are dropped (not "bad") when
`positives_only`.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from esspr_jax import dir_swap
from esspr_jax.atomic_io import atomic_open
from esspr_jax.config.pipeline import DATASET_NAME
from esspr_jax.errors import ConfigError, DataError
from esspr_jax.ingest import pair_files, release_format
from esspr_jax.ingest.skips import SkipCounter
from esspr_jax.input import images

log = logging.getLogger(__name__)

BUILDER_NAME = "esspr_pairs"
SPLIT = "pairs"
_CHECK_EVERY = 10_000  # rows between bad-fraction checks during a build
_IMAGE_CACHE_SIZE = 4096  # prepared images kept in memory (triggers recur across rows)
_SIDES = ("trigger", "recall")
BUILDING = ".building"  # <data_dir>/.building/<name>: a build in progress (swapped in whole)


@dataclasses.dataclass
class PairsBuildConfig(tfds.core.BuilderConfig):
  """One dataset: which CSV and image dir, and how strictly to build it."""
  csv_path: str = ""
  image_dir: str = ""
  strict: bool = False
  max_bad_fraction: float = 0.1
  max_image_side: int = 512  # 0 keeps every image's size
  min_image_side: int = 8
  jpeg_quality: int = 90
  positives_only: bool = True
  # Beam mode: the CSV is staged here as JSON lines and images are prepared by Beam
  # workers (a directory every worker can read). "" = in-process generator.
  beam_stage_dir: str = ""

  def settings(self) -> dict:
    """The settings that shape the output (paths excluded), for the fingerprint."""
    return {k: getattr(self, k) for k in ("max_image_side", "min_image_side", "jpeg_quality",
                                          "positives_only")}


def _side_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "title": tfds.features.Text(),
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
  })


class EssprPairs(tfds.core.GeneratorBasedBuilder):
  """Same-style (trigger, recall) pairs with titles and images."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "eSSPR release-format pairs: ids, titles, RGB JPEG images."}
  BUILDER_CONFIGS = []  # every dataset is a PairsBuildConfig made by build_pairs_dataset

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup needs the undeclared `importlib_resources` backport for
    # builders that live in a package; this file is the answer it would find.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Same-style product pairs (trigger, recall) in the eSSPR release format: "
                     "category names, ids, titles and images of both products."),
        features=tfds.features.FeaturesDict({
            "trigger": _side_features(),
            "recall": _side_features(),
            "cate_lv1_name": tfds.features.Text(),
            "cate_name": tfds.features.Text(),
            "label": np.int32,
            "source_row": np.int64,  # line in the CSV, to trace an example back
        }),
        homepage="https://github.com/benchen4395/esspr_alibaba.com",
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # keep CSV order; Grain shuffles for training
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self.builder_config.beam_stage_dir:
      return {SPLIT: self._beam_examples()}
    return {SPLIT: self._generate_examples()}

  def _beam_examples(self):
    """Beam mode: the driver reads and dedupes the CSV, workers prepare the images."""
    import apache_beam as beam  # noqa: PLC0415  (only for Beam builds)
    config = self.builder_config
    report: dict = {}
    staged = stage_rows_for_beam(config, report)
    self.info.metadata["build_report"] = report
    self.info.metadata["fingerprint"] = fingerprint(config)
    self.info.metadata["inputs"] = inputs(config)
    return (beam.Create(staged)
            | "ReadStagedRows" >> beam.io.ReadAllFromText()
            | "PrepareImages" >> beam.FlatMap(BeamPrepareRow(config)))

  def _generate_examples(self):
    report: dict = {}
    yield from generate_examples(self.builder_config, report)
    self.info.metadata["build_report"] = report
    self.info.metadata["fingerprint"] = fingerprint(self.builder_config)
    self.info.metadata["inputs"] = inputs(self.builder_config)


class _PreparedImages:
  """Validates/encodes each image file once per build; remembers failures for good."""

  def __init__(self, config: PairsBuildConfig):
    self._config = config
    self._ok: collections.OrderedDict[pathlib.Path, bytes] = collections.OrderedDict()
    self._bad: dict[pathlib.Path, images.BadImage] = {}
    self.prepared = 0

  def get(self, ref: str) -> bytes:
    path = images.resolve_image_path(self._config.image_dir, ref)
    if path in self._bad:
      raise self._bad[path]
    if path in self._ok:
      self._ok.move_to_end(path)
      return self._ok[path]
    try:
      data = images.prepare_for_dataset(path, self._config.max_image_side or None,
                                        self._config.min_image_side, self._config.jpeg_quality)
    except images.BadImage as e:
      self._bad[path] = e
      raise
    self.prepared += 1
    self._ok[path] = data
    if len(self._ok) > _IMAGE_CACHE_SIZE:
      self._ok.popitem(last=False)
    return data


def _pair_key(row: release_format.PairRow) -> int:
  """64-bit hash of the unordered id pair (compact enough for tens of millions of rows)."""
  a, b = sorted((row.trigger_id, row.recall_id))
  digest = hashlib.blake2b(f"{a}\x00{b}".encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little")


def _check_fraction(read: SkipCounter, build: SkipCounter, max_bad_fraction: float) -> None:
  """Bad fraction over both stages (CSV parsing and building), as one SkipCounter sees it."""
  combined = SkipCounter(read.what, max_bad_fraction=max_bad_fraction)
  combined.seen = read.seen
  combined.reasons = read.reasons + build.reasons
  combined.check_fraction()


def _new_rows(config: PairsBuildConfig, read_skips: SkipCounter, build_skips: SkipCounter,
              taken: set, dropped: collections.Counter) -> Iterator[tuple[int, Any]]:
  """(pair key, row) for each readable row of the CSV that is not a label-0 row under
  positives_only (counted in dropped['negative_label']) and whose id pair is not in
  `taken` (a duplicate_pair skip); the caller decides when a key is taken. Checks the
  bad-row fraction as it goes."""
  csv_path = pathlib.Path(config.csv_path)
  for row in pair_files.read_pairs(csv_path, read_skips):
    if read_skips.seen % _CHECK_EVERY == 0:
      _check_fraction(read_skips, build_skips, config.max_bad_fraction)
    if config.positives_only and row.label != 1:
      dropped["negative_label"] += 1
      build_skips.ok()
      continue
    key = _pair_key(row)
    if key in taken:
      build_skips.skip("duplicate_pair", f"{csv_path}:{row.source_row}",
                       f"{row.trigger_id} / {row.recall_id}")
      continue
    yield key, row


def generate_examples(config: PairsBuildConfig, report: dict) -> Iterator[tuple[int, dict]]:
  """(key, example) for every good row of `config.csv_path`; fills `report` at the end."""
  csv_path = pathlib.Path(config.csv_path)
  pair_files.expand(csv_path)  # a file, glob or mining output's shards; DataError if none
  if not pathlib.Path(config.image_dir).is_dir():
    raise DataError(f"image dir not found: {config.image_dir} (for {csv_path})")
  what = f"building {config.name} from {csv_path}"
  read_skips = SkipCounter(what, strict=config.strict)
  build_skips = SkipCounter(what, strict=config.strict)
  prepared = _PreparedImages(config)
  written: set[int] = set()
  empty_titles = collections.Counter()
  dropped = collections.Counter()
  for key, row in _new_rows(config, read_skips, build_skips, written, dropped):
    where = f"{csv_path}:{row.source_row}"
    try:
      side_images = {side: prepared.get(getattr(row, f"{side}_img")) for side in _SIDES}
    except images.BadImage as e:
      build_skips.skip(e.reason, where, e.detail)
      continue
    for side in _SIDES:
      if not getattr(row, f"{side}_title").strip():
        empty_titles[side] += 1
    written.add(key)
    build_skips.ok()
    yield row.source_row, _example(row, side_images)
  _check_fraction(read_skips, build_skips, config.max_bad_fraction)
  negatives = dropped["negative_label"]
  if not written:
    raise DataError(nothing_to_build(csv_path, read_skips, build_skips, negatives))
  report.update({
      "csv_path": str(csv_path),
      "image_dir": str(config.image_dir),
      "rows_read": read_skips.seen,
      "examples_written": len(written),
      "skipped": read_skips.skipped + build_skips.skipped,
      "skipped_by_reason": dict(read_skips.reasons + build_skips.reasons),
      "dropped_negative_label": negatives,
      "empty_titles_kept": dict(empty_titles),
      "images_prepared": prepared.prepared,
  })
  log.info("%s: %s", what, json.dumps(report))


def nothing_to_build(csv_path, read: SkipCounter, build: SkipCounter, negatives: int) -> str:
  """Why a pair file gave no example, in one line (instead of TFDS's 'No examples were
  yielded' AssertionError)."""
  if not read.seen:
    why = "it has a header but no rows"
  elif negatives and negatives == read.seen - read.skipped:
    why = (f"all {negatives} readable rows have label 0, and positives_only keeps label-1 "
           f"rows only")
  else:
    reasons = dict(read.reasons + build.reasons)
    why = f"every one of its {read.seen} rows was skipped ({reasons})"
  return f"{csv_path}: no pairs to build: {why}"


def _example(row: release_format.PairRow, side_images: dict) -> dict:
  return {
      side: {"id": getattr(row, f"{side}_id"), "title": getattr(row, f"{side}_title"),
             "image": side_images[side]} for side in _SIDES
  } | {"cate_lv1_name": row.cate_lv1_name, "cate_name": row.cate_name,
       "label": row.label, "source_row": row.source_row}


_STAGE_ROWS_PER_FILE = 100_000


def stage_rows_for_beam(config: PairsBuildConfig, report: dict) -> list[str]:
  """Beam driver: reads the CSV once (line numbers, CSV-level skips, label-0 drops,
  duplicate id pairs: the first row wins) and writes the surviving rows as JSON-lines
  files under `config.beam_stage_dir`. Returns their paths."""
  csv_path = pathlib.Path(config.csv_path)
  what = f"building {config.name} from {csv_path}"
  read_skips = SkipCounter(what, strict=config.strict)
  build_skips = SkipCounter(what, strict=config.strict)
  stage = epath.Path(config.beam_stage_dir)
  stage.mkdir(parents=True, exist_ok=True)
  seen: set[int] = set()
  dropped = collections.Counter()
  staged, files, out = 0, [], None
  try:
    for key, row in _new_rows(config, read_skips, build_skips, seen, dropped):
      seen.add(key)
      build_skips.ok()
      if staged % _STAGE_ROWS_PER_FILE == 0:
        if out:
          out.close()
        files.append(str(stage / f"rows-{len(files):05d}.jsonl"))
        out = epath.Path(files[-1]).open("w")
      out.write(json.dumps(dataclasses.asdict(row)) + "\n")
      staged += 1
  finally:
    if out:
      out.close()
  _check_fraction(read_skips, build_skips, config.max_bad_fraction)
  negatives = dropped["negative_label"]
  report.update({
      "csv_path": str(csv_path), "image_dir": str(config.image_dir),
      "rows_read": read_skips.seen, "rows_staged": staged,
      "skipped": read_skips.skipped + build_skips.skipped,
      "skipped_by_reason": dict(read_skips.reasons + build_skips.reasons),
      "dropped_negative_label": negatives,
  })
  if not files:
    raise DataError(nothing_to_build(csv_path, read_skips, build_skips, negatives))
  return files


class BeamPrepareRow:
  """Beam worker: one staged row -> (key, example), or a counted image skip.

  Skip reasons become Beam counters in namespace `esspr_pairs`; `strict` raises,
  naming the CSV line."""

  def __init__(self, config: PairsBuildConfig):
    self._config = config
    self._images: _PreparedImages | None = None  # per worker, built on first use

  def __call__(self, line: str) -> Iterator[tuple[int, dict]]:
    import apache_beam as beam  # noqa: PLC0415  (only for Beam builds)
    row = release_format.PairRow(**json.loads(line))
    if self._images is None:
      self._images = _PreparedImages(self._config)
    try:
      side_images = {side: self._images.get(getattr(row, f"{side}_img")) for side in _SIDES}
    except images.BadImage as e:
      beam.metrics.Metrics.counter(BUILDER_NAME, e.reason).inc()
      if self._config.strict:
        raise DataError(f"building {self._config.name}: {self._config.csv_path}:"
                        f"{row.source_row}: {e.reason}: {e.detail}") from None
      return
    yield row.source_row, _example(row, side_images)


def inputs(config: PairsBuildConfig) -> dict:
  """What a dataset is built from: the pair files (the CSV, or every shard its glob
  names: resolved paths and one content hash), the image dir its image paths resolve
  against (resolved path), and the output settings. The image files themselves are not
  hashed (that would read every image on each reuse)."""
  h = hashlib.sha256()
  paths = pair_files.expand(config.csv_path)
  for path in paths:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return {"csv_path": [os.path.realpath(p) for p in paths], "csv_sha256": h.hexdigest(),
          "image_dir": os.path.realpath(config.image_dir), "settings": config.settings()}


def fingerprint(config: PairsBuildConfig) -> str:
  """One hash of `inputs(config)`: equal iff the dataset can be reused."""
  return hashlib.sha256(json.dumps(inputs(config), sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class PairsDataset:
  """A built dataset: where it is, how many examples, and its build report."""
  path: pathlib.Path
  num_examples: int
  report: dict

  def source(self):
    """Random-access data source (images as JPEG bytes, text as bytes) for Grain."""
    return open_pairs_source(self.path)


def dataset_path(data_dir: str | pathlib.Path, name: str) -> pathlib.Path:
  return pathlib.Path(data_dir) / BUILDER_NAME / name / str(EssprPairs.VERSION)


def _validate_name(name: str) -> None:
  if not isinstance(name, str) or not DATASET_NAME.fullmatch(name):
    raise ConfigError("data.pipeline.*_dataset",
                      f"dataset name must be lower_snake_case, got {name!r}")


def build_pairs_dataset(csv_path: str | pathlib.Path, image_dir: str | pathlib.Path,
                        data_dir: str | pathlib.Path, name: str, *, strict: bool = False,
                        max_bad_fraction: float = 0.1, max_image_side: int = 512,
                        min_image_side: int = 8, jpeg_quality: int = 90,
                        positives_only: bool = True, beam_runner: str | None = None,
                        beam_options: Sequence[str] = (),
                        beam_stage_dir: str | None = None) -> PairsDataset:
  """Builds (or reuses) dataset `name` from a release-format CSV and its image dir.

  An existing dataset is reused if it was built from the same inputs (`inputs`: the
  CSV's path and bytes, the image dir, the settings); otherwise it is rebuilt (it is
  derived data), with a warning naming what changed. A CSV that yields no example (a
  header only, label-0 rows only, every row bad) is a DataError saying which. Raises DataError on strict-mode bad
  rows or too many bad rows. A build is made beside (`<data_dir>/.building/<name>`)
  and swapped in whole, so a failed or killed rebuild leaves the previous dataset as it
  was and never a partial one; the next build removes what a killed one left.

  `beam_runner` (e.g. 'DirectRunner', 'DataflowRunner') builds with Apache Beam:
  images are prepared by Beam workers, with `beam_options` as pipeline flags
  (e.g. ['--direct_num_workers=8', '--direct_running_mode=multi_processing']). Rows
  are staged in `beam_stage_dir` (default `<data_dir>/.staging/<name>`; it must be
  readable by every worker, as must the image dir) and removed afterwards.
  """
  _validate_name(name)
  pair_files.expand(csv_path)  # DataError naming it when no file matches
  if not pathlib.Path(image_dir).is_dir():
    raise DataError(f"image dir not found: {image_dir} (for {csv_path})")
  stage = ""
  if beam_runner:
    stage = str(beam_stage_dir or epath.Path(data_dir) / ".staging" / name)
  config = PairsBuildConfig(
      name=name, csv_path=str(csv_path), image_dir=str(image_dir), strict=strict,
      max_bad_fraction=max_bad_fraction, max_image_side=max_image_side,
      min_image_side=min_image_side, jpeg_quality=jpeg_quality, positives_only=positives_only,
      beam_stage_dir=stage, description=f"pairs from {csv_path}")
  path = dataset_path(data_dir, name)
  building = pathlib.Path(data_dir) / BUILDING / name
  _remove_leftovers(path, building, stage)
  if path.is_dir():
    stored = _read_metadata(path)
    if stored.get("fingerprint") == fingerprint(config):
      log.info("reusing dataset %s (same CSV, image dir and settings)", path)
      return open_pairs(path)
    before, now = stored.get("inputs") or {}, inputs(config)
    changed = [k for k in now if before.get(k) != now[k]] if before else ["its inputs"]
    log.warning("dataset %s was built from other inputs (%s changed); rebuilding it (the old "
                "one stays until the new one is built)", path, ", ".join(changed))
  # Built beside (TFDS's temporaries with it), then swapped in whole: a failed or killed
  # build leaves the previous dataset as it was.
  builder = EssprPairs(config=config, data_dir=str(building), file_format="array_record")
  download_config = tfds.download.DownloadConfig()
  if beam_runner:
    from apache_beam.options.pipeline_options import PipelineOptions  # noqa: PLC0415  (Beam builds)
    download_config = tfds.download.DownloadConfig(
        beam_runner=beam_runner, beam_options=PipelineOptions(flags=list(beam_options)))
  try:
    builder.download_and_prepare(download_config=download_config)
    if beam_runner:
      _finish_beam_report(dataset_path(building, name), max_bad_fraction)
    dir_swap.swap_in(dataset_path(building, name), path)
  finally:
    if stage and epath.Path(stage).exists():
      epath.Path(stage).rmtree()
    shutil.rmtree(building, ignore_errors=True)
    with contextlib.suppress(OSError):
      building.parent.rmdir()  # when no other build is under way
  return open_pairs(path)


def _remove_leftovers(path: pathlib.Path, building: pathlib.Path, stage: str) -> None:
  """What a killed build left: its build dir (and the old dataset a swap moved there),
  its Beam rows, and TFDS temporaries beside the dataset from builds made in place."""
  stale = [building] if building.exists() else []
  stale += sorted(path.parent.glob("incomplete.*")) if path.parent.is_dir() else []
  for leftover in stale:
    log.warning("removing %s, left by an interrupted dataset build", leftover)
    shutil.rmtree(leftover, ignore_errors=True)
  if stage and epath.Path(stage).exists():
    epath.Path(stage).rmtree()


def _finish_beam_report(path: pathlib.Path, max_bad_fraction: float) -> None:
  """After a Beam build: rows the workers dropped for bad images, and the bad-fraction
  check over everything (per-reason image counts are the runner's `esspr_pairs`
  counters)."""
  meta = _read_metadata(path)
  report = meta["build_report"]
  written = open_pairs(path).num_examples
  report["examples_written"] = written
  report["image_skips"] = report["rows_staged"] - written
  report["skipped"] += report["image_skips"]
  if report["skipped_by_reason"] is not None and report["image_skips"]:
    report["skipped_by_reason"]["bad_image (see Beam counters)"] = report["image_skips"]
  _write_json_atomic(path / "metadata.json", meta)
  log.info("built %s with Beam: %s", path, json.dumps(report))
  rows = report["rows_read"]
  if rows and report["skipped"] / rows > max_bad_fraction:
    shutil.rmtree(path)
    raise DataError(
        f"building {path}: {report['skipped']} of {rows} rows were bad "
        f"({report['skipped'] / rows:.1%} > max_bad_fraction={max_bad_fraction}); "
        f"reasons: {report['skipped_by_reason']}")


def _write_json_atomic(path: pathlib.Path, obj) -> None:
  with atomic_open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f)


def build_from_config(config, csv_path, image_dir, name: str, data_dir=None) -> PairsDataset:
  """`build_pairs_dataset` with the settings of `config.data.pipeline.build`."""
  p = config.data.pipeline
  b = p.build
  data_dir = data_dir or p.data_dir
  if not data_dir:
    raise ConfigError("data.pipeline.data_dir", "set it (or pass data_dir) to build a dataset")
  return build_pairs_dataset(csv_path, image_dir, data_dir, name, strict=b.strict,
                             max_bad_fraction=b.max_bad_fraction,
                             max_image_side=b.max_image_side, min_image_side=b.min_image_side,
                             jpeg_quality=b.jpeg_quality, positives_only=b.positives_only,
                             beam_runner=b.beam_runner or None,
                             beam_options=b.beam_options.split())


def _read_metadata(path: pathlib.Path) -> dict:
  meta = path / "metadata.json"
  if not meta.is_file():
    return {}
  return json.loads(meta.read_text())


def open_pairs(path: str | pathlib.Path) -> PairsDataset:
  """A built dataset at `path` (`dataset_path(data_dir, name)`)."""
  path = pathlib.Path(path)
  if not (path / "dataset_info.json").is_file():
    raise DataError(f"no built pairs dataset at {path}; build it first "
                    "(esspr_jax.input.esspr_tfds.build_pairs_dataset, docs/dataset.md)")
  info = json.loads((path / "dataset_info.json").read_text())
  splits = {s["name"]: s for s in info.get("splits", [])}
  if SPLIT not in splits:
    raise DataError(f"{path}: not an {BUILDER_NAME} dataset (no split {SPLIT!r})")
  num = sum(int(n) for n in splits[SPLIT].get("shardLengths", []))
  return PairsDataset(path=path, num_examples=num,
                      report=_read_metadata(path).get("build_report", {}))


_SKIP_IMAGE_DECODING = {side: {"image": tfds.decode.SkipDecoding()} for side in _SIDES}


def open_pairs_source(path: str | pathlib.Path) -> Any:
  """Random-access source over a built dataset's examples (images and text as bytes)."""
  path = pathlib.Path(path)
  open_pairs(path)  # clear error if it is not there
  builder = tfds.builder_from_directory(str(path))
  return builder.as_data_source(split=SPLIT, decoders=_SKIP_IMAGE_DECODING)


def data_dir_from_config(config, data_dir=None) -> pathlib.Path:
  data_dir = data_dir or config.data.pipeline.data_dir
  if not data_dir:
    raise ConfigError("data.pipeline.data_dir",
                      "no TFDS data dir: set it, or pass data_dir (e.g. <workdir>/tfds)")
  return pathlib.Path(data_dir)
