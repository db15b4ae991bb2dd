"""Demo-world generation time, click-log mining rows/s on Beam's DirectRunner, and pair
precision against the hidden style ids with and without the mining constraints.

  python benchmarks/bench_mining.py [--preset demo] [--world DIR] [--multi_process]

--world reuses an existing world (generates one there if it has no manifest.json).
--multi_process adds a run with --direct_running_mode=multi_processing on all cores.
Prints two tables (markdown), the figures quoted in docs/data.md.
"""
import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from esspr_jax.config.data import mining_config, world_config  # noqa: E402
from esspr_jax.demo_world import synthetic  # noqa: E402
from esspr_jax.ingest import mining
from esspr_jax.demo_world.pair_precision import pair_precision  # noqa: E402

VARIANTS = (  # name, config overrides
    ("no constraints", dict(category_constraint=False, relevance_constraint=False)),
    ("category only", dict(relevance_constraint=False)),
    ("relevance only", dict(category_constraint=False)),
    ("category + relevance (default)", dict()),
    ("default + min_coclicks=2", dict(min_coclicks=2)),
)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="demo")
  parser.add_argument("--world", default=None)
  parser.add_argument("--multi_process", action="store_true")
  args = parser.parse_args()
  root = pathlib.Path(args.world or tempfile.mkdtemp(prefix="esspr_world_"))
  paths = synthetic.WorldPaths.under(root)
  if not paths.manifest.exists():
    start = time.perf_counter()
    cpu = time.process_time()
    synthetic.generate_world(world_config(args.preset), root)
    wall = time.perf_counter() - start
    children = os.times().children_user + os.times().children_system
    counts = json.loads(paths.manifest.read_text())["counts"]
    print(f"| world ({args.preset}) | listings | click-log rows | wall s | CPU s |")
    print("|---|---|---|---|---|")
    print(f"| {root} | {counts['listings']:,} | {counts['clicklog_rows']:,} | {wall:.1f} | "
          f"{time.process_time() - cpu + children:.1f} |\n")

  runs = [(name, overrides, ()) for name, overrides in VARIANTS]
  if args.multi_process:
    runs.append(("default, multi_processing", {},
                 ("--direct_running_mode=multi_processing",
                  f"--direct_num_workers={os.cpu_count()}")))
  print("| mining (DirectRunner) | pairs | precision | rows read | seconds | rows/s |")
  print("|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory(dir=root) as tmp:
    for name, overrides, beam_args in runs:
      cfg = mining_config(args.preset)
      for k, v in overrides.items():
        cfg[k] = v
      out = pathlib.Path(tmp) / "pairs.csv"
      report = mining.mine_pairs(paths.clicklog, paths.catalog, out, cfg, beam_args,
                                 verbose=False)
      prec = pair_precision(out, paths.catalog)
      print(f"| {name} | {report.pairs_written:,} | {prec.precision:.3f} | "
            f"{report.rows_read:,} | {report.seconds:.1f} | "
            f"{report.rows_read / report.seconds:,.0f} |", flush=True)


if __name__ == "__main__":
  main()
