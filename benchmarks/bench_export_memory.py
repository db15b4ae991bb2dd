"""Peak RSS of export, index build and a search batch at catalog scale (no images).

    .venv/bin/python benchmarks/bench_export_memory.py                  # 200k and 2M
    .venv/bin/python benchmarks/bench_export_memory.py --sizes 200000 --stages export

Synthetic listings (ids, titles, suppliers, categories and unit vectors, drawn chunk by
chunk) go through the export path itself (export.export_vectors: the chunk writer,
the streamed shard and Parquet files, the duplicate-id check, the sha256 manifest),
then export.build_indexes (ScaNN above eval.index.exact_max_gallery) and a search
batch (Searcher.open, --queries stored vectors searched at k=20, plus by_id lookups).
Each stage runs in a fresh process, which reports its own peak RSS
(getrusage ru_maxrss) and its RSS after imports; the table shows both and the
difference, so growth with the catalog is visible. The export stage's peak must not
grow with the catalog: its memory is one chunk (eval.export.chunk_rows rows).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _config(dim: int):
  from esspr_jax.config import compose  # noqa: PLC0415
  config = compose("base")
  config.unlock()
  config.model.embed_dim = dim
  config.eval.export.modalities = "m"
  config.lock()
  return config


def _chunks(n: int, dim: int, rows: int):
  import numpy as np  # noqa: PLC0415
  for start in range(0, n, rows):
    stop = min(n, start + rows)
    rng = np.random.default_rng(start)
    v = rng.normal(size=(stop - start, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    r = range(start, stop)
    yield ([f"L{i:09d}" for i in r], {"m": v},
           {"listing_id": [f"L{i:09d}" for i in r], "title": [f"synthetic listing {i} mug" for i in r],
            "supplier_id": [f"S{i % 50_000:05d}" for i in r], "category": [f"c{i % 300}" for i in r],
            "image": [""] * (stop - start)})


def stage(name: str, n: int, dim: int, out: str, queries: int) -> dict:
  """Runs one stage in this process; returns its figures."""
  import numpy as np  # noqa: PLC0415
  from esspr_jax.retrieval import export, search  # noqa: PLC0415
  config = _config(dim)
  import jax  # noqa: PLC0415,F401  (imported before the baseline, as every stage needs it)
  base = _rss_mib()
  start = time.perf_counter()
  info = {}
  if name == "export":
    manifest = export.export_vectors(_chunks(n, dim, config.eval.export.chunk_rows), out, config,
                                     build_indexes=False)
    info["count"] = manifest["count"]
  elif name == "index":
    manifest = export.build_indexes(out, config)
    info["kind"] = manifest["index"]["m"]["kind"]
    info["recall"] = manifest["index"]["m"]["recall"]
  elif name == "search":
    s = search.Searcher(out)
    rows = np.random.default_rng(1).choice(len(s.ids), size=queries, replace=False)
    ids, _ = s.index("m").search(np.asarray(s.vectors("m")[rows], np.float32), 20)
    hits = [s.by_id(s.ids[r], k=20) for r in rows[:10]]
    info["hits"] = int(sum(len(h) for h in hits))
  else:
    raise SystemExit(f"unknown stage {name}")
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return dict(info, stage=name, n=n, seconds=time.perf_counter() - start, base_mib=base,
              peak_mib=peak)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="200000,2000000")
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--stages", default="export,index,search")
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--out", default="", help="work dir (default: a temp dir, removed after)")
  p.add_argument("--_stage", default="", help=argparse.SUPPRESS)
  p.add_argument("--_n", type=int, default=0, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args._stage:
    print(json.dumps(stage(args._stage, args._n, args.dim, args.out, args.queries)))
    return
  root = args.out or tempfile.mkdtemp(prefix="bench_export_memory-")
  results = []
  try:
    for n in (int(x) for x in args.sizes.split(",")):
      out = os.path.join(root, f"export-{n}")
      for name in args.stages.split(","):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--_stage={name}",
                               f"--_n={n}", f"--dim={args.dim}", f"--out={out}",
                               f"--queries={args.queries}"], capture_output=True, text=True)
        if proc.returncode:
          sys.exit(f"stage {name} at {n} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{name} {n:,}: peak {r['peak_mib']:.0f} MiB (after imports {r['base_mib']:.0f}), "
              f"{r['seconds']:.1f}s", flush=True)
      shutil.rmtree(out, ignore_errors=True)
  finally:
    if not args.out:
      shutil.rmtree(root, ignore_errors=True)
  print(f"\n| stage (D={args.dim}, 1 modality, float32) | listings | peak RSS MiB | RSS after "
        f"imports MiB | peak - imports MiB | seconds | note |")
  print("|---|---|---|---|---|---|---|")
  for r in results:
    note = {"index": f"{r.get('kind')} recall@20 {r.get('recall', float('nan')):.4f}",
            "search": f"{args.queries} queries + 10 by_id", "export": ""}[r["stage"]]
    print(f"| {r['stage']} | {r['n']:,} | {r['peak_mib']:.0f} | {r['base_mib']:.0f} | "
          f"{r['peak_mib'] - r['base_mib']:.0f} | {r['seconds']:.1f} | {note} |")
  exports = [r for r in results if r["stage"] == "export"]
  if len(exports) >= 2:
    a, b = exports[0], exports[-1]
    print(f"\nexport peak growth {a['n']:,} -> {b['n']:,} listings: "
          f"{b['peak_mib'] - a['peak_mib']:+.0f} MiB ({b['peak_mib'] / a['peak_mib']:.2f}x)")


if __name__ == "__main__":
  main()
