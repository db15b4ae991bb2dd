"""Every shipped accelerator config compiled for the slice it is laid out for.

    python benchmarks/aot_topologies.py                       # the table of docs/performance.md
    python benchmarks/aot_topologies.py --remat_sweep=configs/pod_v5e.py   # remat policies
    python benchmarks/aot_topologies.py --configs=configs/base.py --out=/tmp/aot.md

Each row is one `esspr-jax --mode=compile` run in its own process (the real XLA:TPU
compiler on libtpu's compile-only devices, `pip install -e '.[tpu]'`; the GPU row needs
`pip install -e '.[cuda12]'` instead; no accelerator attached either way),
its figures read back from the JSON report it writes. A config names its slice in a
module-level `TOPOLOGY`. Columns: GiB per chip (and % of HBM), the compiled program's
TFLOP per chip per step, the model's TFLOP per chip per step (model_flops.py), their
ratio (remat and gradient caching push it above 1), the roofline step time (compiled
FLOPs at the chip's peak), examples/s per chip at 50% MFU, and compile seconds.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # config files import esspr_jax
ACCELERATOR_CONFIGS = ("configs/pod_v5e.py", "configs/pod_v5e_256.py", "configs/large.py",
                       "configs/base.py", "configs/gpu_8x.py")
POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable", "off")
GiB = 1024 ** 3


def topology_of(config_file: str) -> str:
  spec = importlib.util.spec_from_file_location("config_module", REPO / config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.TOPOLOGY


def compile_row(config_file: str, topology: str, overrides=(), timeout: int = 3600) -> dict:
  """One --mode=compile run: its JSON report, or {'error': the one line} when it fails."""
  with tempfile.TemporaryDirectory(prefix="aot-") as workdir:
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    if topology.startswith("h100"):  # no GPU to autotune Triton's matmul tiles on
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false")
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "esspr_jax.main", f"--config={config_file}",
         f"--workdir={workdir}", "--mode=compile", f"--topology={topology}", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    path = pathlib.Path(workdir) / "compile" / f"{topology}.json"
    if done.returncode == 0 and path.is_file():
      return json.loads(path.read_text())
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    return {"error": (lines or done.stderr.strip().splitlines()[-1:] or ["?"])[-1],
            "seconds": time.time() - start}


def _row(name: str, topology: str, r: dict) -> str:
  if "error" in r:
    need = re.search(r"\(([\d.]+G)\) exceeds available HBM \(([\d.]+G)\)", r["error"])
    what = (f"does not fit: {need[1]} of temporaries > {need[2]} HBM" if need
            else r["error"][:160])
    return f"| {name} | {topology} | - | {what} | | | | | | |"
  train = r["train_step"]
  per_chip = train["memory"]["total"] / GiB
  compiled = train["flops_per_device"] or 0
  model = (r["model_flops_per_step"] or 0) / r["devices"]
  ratio = f"{compiled / model:.2f}" if model and compiled else "-"
  roof = f"{r['roofline_step_seconds']:.3f}" if r["roofline_step_seconds"] else "-"
  rate = r["examples_per_second_per_device_at_50pct_mfu"]
  compiled_text = f"{compiled / 1e12:.2f}" if compiled else "-"
  return (f"| {name} | {topology} | {r['global_batch']} | {per_chip:.2f} "
          f"({100 * r['hbm_fraction']:.0f}%) | {compiled_text} | {model / 1e12:.2f} | "
          f"{ratio} | {roof} | {rate:.0f} | {train['compile_seconds']:.0f} |")


HEADER = ("| config | topology | global batch | GiB per chip (% HBM) | compiled TFLOP/chip/step "
          "| model TFLOP/chip/step | compiled/model | roofline step s | ex/s/chip at 50% MFU "
          "| compile s |\n|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", nargs="*", default=list(ACCELERATOR_CONFIGS))
  parser.add_argument("--remat_sweep", default="", help="a config file: one row per policy")
  parser.add_argument("--policies", nargs="*", default=list(POLICIES),
                      help="with --remat_sweep: the policies to compile ('off': no remat)")
  parser.add_argument("--out", default="", help="also write the table here")
  args = parser.parse_args()
  lines = [HEADER]
  print(HEADER, flush=True)
  if args.remat_sweep:
    topology = topology_of(args.remat_sweep)
    for policy in args.policies:
      overrides = (["--config.model.remat=False"] if policy == "off" else
                   ["--config.model.remat=True", f"--config.model.remat_policy={policy}"])
      lines.append(_row(f"{args.remat_sweep} remat={policy}", topology,
                        compile_row(args.remat_sweep, topology, overrides)))
      print(lines[-1], flush=True)
  else:
    for config_file in args.configs:
      topology = topology_of(config_file)
      lines.append(_row(config_file, topology, compile_row(config_file, topology)))
      print(lines[-1], flush=True)
  if args.out:
    pathlib.Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
