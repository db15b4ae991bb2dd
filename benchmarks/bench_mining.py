"""Click-log mining: throughput at 2M click rows (in-process vs 2 worker processes), and
pair precision against the demo world's hidden style ids for each mining constraint,
the optional title-overlap constraint included.

  python benchmarks/bench_mining.py [--rows_world DIR] [--precision_world DIR]
      [--sessions 200000] [--workers 2] [--skip_throughput] [--skip_precision]

A world directory is reused if it holds a manifest.json, else generated there (demo
preset; the throughput world with --sessions sessions of 10 results: 2M rows).
Throughput runs the same default mining config twice, side by side: in-process
(LocalRunner, in_memory) and --direct_running_mode=multi_processing with --workers
processes; the ratio is the figure to quote. Prints markdown tables (docs/data.md).
"""
import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from esspr_jax.config.data import mining_config, world_config
from esspr_jax.demo_world import synthetic
from esspr_jax.demo_world.pair_precision import pair_precision
from esspr_jax.ingest import mining

VARIANTS = (  # name, config overrides
    ("no constraints", dict(category_constraint=False, relevance_constraint=False)),
    ("category only", dict(relevance_constraint=False)),
    ("relevance only", dict(category_constraint=False)),
    ("category + relevance (default)", dict()),
    ("default + title overlap >= 0.1", dict(min_title_overlap=0.1)),
    ("default + title overlap >= 0.2", dict(min_title_overlap=0.2)),
    ("default + title overlap >= 0.3", dict(min_title_overlap=0.3)),
    ("title overlap >= 0.2 only", dict(category_constraint=False, relevance_constraint=False,
                                       min_title_overlap=0.2)),
    ("default + min_coclicks=2", dict(min_coclicks=2)),
)


def _world(path: str | None, sessions: int | None, label: str) -> synthetic.WorldPaths:
  root = pathlib.Path(path or tempfile.mkdtemp(prefix=f"esspr_{label}_"))
  paths = synthetic.WorldPaths.under(root)
  if not paths.manifest.exists():
    cfg = world_config("demo")
    if sessions:
      cfg.num_sessions = sessions
    start = time.perf_counter()
    synthetic.generate_world(cfg, root)
    print(f"generated {label} world at {root} in {time.perf_counter() - start:.0f}s",
          flush=True)
  counts = json.loads(paths.manifest.read_text())["counts"]
  print(f"{label} world: {root}: {counts['listings']:,} listings, "
        f"{counts['clicklog_rows']:,} click-log rows", flush=True)
  return paths


def throughput(paths: synthetic.WorldPaths, workers: int) -> None:
  runs = (("in-process (LocalRunner, in_memory)", ()),
          (f"multi_processing, {workers} workers",
           ("--direct_running_mode=multi_processing", f"--direct_num_workers={workers}")))
  rates = []
  print(f"\n| mining, default config, {os.cpu_count()} cores | rows read | pairs | shards | "
        "seconds | rows/s | vs in-process | load avg at start |")
  print("|---|---|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory(dir=paths.out_dir) as tmp:
    for name, beam_args in runs:
      load = os.getloadavg()[0]  # the machine is shared: say how busy it was
      out = pathlib.Path(tmp) / "pairs.csv"
      report = mining.mine_pairs(paths.clicklog, paths.catalog, out, mining_config("demo"),
                                 beam_args, verbose=False)
      rates.append(report.rows_read / report.seconds)
      print(f"| {name} | {report.rows_read:,} | {report.pairs_written:,} | "
            f"{len(report.output_files)} | {report.seconds:.1f} | {rates[-1]:,.0f} | "
            f"{rates[-1] / rates[0]:.2f}x | {load:.1f} |", flush=True)


def precision(paths: synthetic.WorldPaths) -> None:
  print("\n| mining (in-process) | pairs | precision | dropped by title overlap | seconds |")
  print("|---|---|---|---|---|")
  with tempfile.TemporaryDirectory(dir=paths.out_dir) as tmp:
    for name, overrides in VARIANTS:
      cfg = mining_config("demo")
      for k, v in overrides.items():
        cfg[k] = v
      out = pathlib.Path(tmp) / "pairs.csv"
      report = mining.mine_pairs(paths.clicklog, paths.catalog, out, cfg, verbose=False)
      prec = pair_precision(out, paths.catalog)
      print(f"| {name} | {report.pairs_written:,} | {prec.precision:.3f} | "
            f"{report.stages['dropped_title_overlap']:,} | {report.seconds:.1f} |", flush=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows_world", default=None)
  parser.add_argument("--precision_world", default=None)
  parser.add_argument("--sessions", type=int, default=200_000)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--skip_throughput", action="store_true")
  parser.add_argument("--skip_precision", action="store_true")
  args = parser.parse_args()
  if not args.skip_precision:
    precision(_world(args.precision_world, None, "demo"))
  if not args.skip_throughput:
    throughput(_world(args.rows_world, args.sessions, "2M-row"), args.workers)


if __name__ == "__main__":
  main()
