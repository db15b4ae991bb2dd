"""--mode=compile: the real steps compiled for a topology this machine does not have.

TPU cases use libtpu's compile-only devices (`v5e:2x2`: 4 chips, the real XLA:TPU
compiler, no TPU attached); `cpu:8` is the same code path on virtual CPU devices.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from esspr_jax import cli, compile_report
from esspr_jax.config import compose

REPO = pathlib.Path(__file__).resolve().parents[1]
REPORT_KEYS = ("topology", "device_kind", "devices", "hosts", "mesh", "global_batch",
               "hbm_per_device", "hbm_fraction", "fits", "within_margin",
               "peak_flops_per_device", "model_flops_per_step", "compiled_flops_per_step",
               "roofline_step_seconds", "examples_per_second_per_device_at_50pct_mfu",
               "train_step", "embed_step", "embed_batch")
STEP_KEYS = ("name", "memory", "flops_per_device", "collectives", "compile_seconds")
MEMORY_KEYS = ("arguments", "outputs", "aliased", "temporaries", "code", "total")


def _compile(tmp_path, config_file, topology, *overrides):
  argv = ["esspr-jax", f"--config={config_file}", f"--workdir={tmp_path}", "--mode=compile",
          f"--topology={topology}", *overrides]
  return cli.execute(argv)


def _report(tmp_path, topology) -> dict:
  return json.loads((tmp_path / "compile" / f"{topology}.json").read_text())


def _check_report(report, topology, devices, accelerator: bool):
  assert set(REPORT_KEYS) <= set(report), set(REPORT_KEYS) - set(report)
  assert report["topology"] == topology and report["devices"] == devices
  for step in ("train_step", "embed_step"):
    assert set(STEP_KEYS) <= set(report[step])
    memory = report[step]["memory"]
    assert set(MEMORY_KEYS) <= set(memory)
    assert memory["total"] > 0 and memory["arguments"] > 0
    assert report[step]["flops_per_device"] > 0 and report[step]["compile_seconds"] > 0
  assert report["model_flops_per_step"] > 0 and report["compiled_flops_per_step"] > 0
  # The partitioned program of every device together does at least the model's work.
  assert report["compiled_flops_per_step"] >= 0.9 * report["model_flops_per_step"]
  if accelerator:
    assert report["hbm_per_device"] > 0 and 0 < report["hbm_fraction"] < 1
    assert report["fits"] is True and report["roofline_step_seconds"] > 0
  else:
    assert report["hbm_per_device"] is None and report["fits"] is None


@pytest.mark.parametrize("preset", ["tiny", "demo"])
@pytest.mark.parametrize("topology,devices,accelerator",
                         [("cpu:8", 8, False), ("v5e:2x2", 4, True)])
def test_compile_mode_reports_every_field(tmp_path, capsys, preset, topology, devices,
                                          accelerator):
  assert _compile(tmp_path, f"configs/{preset}.py", topology) == 0
  report = _report(tmp_path, topology)
  _check_report(report, topology, devices, accelerator)
  assert report["mesh"] == {"data": devices, "fsdp": 1, "tensor": 1}
  if accelerator:
    assert report["device_kind"] == "TPU v5 lite"
    # Data parallel: the gradients are all-reduced across the chips.
    assert report["train_step"]["collectives"]["all-reduce"]["count"] >= 1
  out = capsys.readouterr().out
  assert f"[compile] {topology}: {devices} x" in out and "| train step |" in out


def test_tpu_hlo_of_the_row_split_loss_gathers_no_score_matrix(tmp_path):
  """B=512 on 4 TPU chips, embeddings of 32: every all-gather the real TPU compiler
  inserts carries embeddings ([B, 32]), never a [B, B] score matrix or a [chunk, B]
  block (the CPU HLO test, tests/losses/test_sharded.py, against XLA:TPU)."""
  from esspr_jax import compile_check
  config = compose("tiny")
  config.train.batch_size = 512
  config.loss.chunk_size = 128
  report = compile_check.compile_for(config, "v5e:2x2")
  _check_report(report.to_json(), "v5e:2x2", 4, accelerator=True)
  assert report.fits
  gathers = [c for c in compile_report.collectives(report.train.hlo) if c["op"] == "all-gather"]
  assert gathers, "expected the gallery all-gathers"
  largest = max(c["elements"] for c in gathers)
  assert largest < 128 * 512, sorted(c["elements"] for c in gathers)[-5:]


def test_a_step_that_does_not_fit_exits_2_naming_the_keys(tmp_path, capsys):
  code = _compile(tmp_path, "configs/demo.py", "v5e:2x2", "--config.train.batch_size=65536")
  assert code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: config.train: the train step does not fit")
  for key in ("model.remat", "train.batch_size", "train.grad_accum_steps", "train.mesh.fsdp"):
    assert key in err[0]
  assert "Traceback" not in err[0] and "train.batch_size=65536" in err[0]


@pytest.mark.parametrize("topology,words", [("v9z:2x2", "libtpu cannot describe"),
                                            ("banana", "expected 'cpu:N'"),
                                            ("cpu:64", "this process has 8 CPU devices")])
def test_a_topology_nothing_knows_is_one_error_line(tmp_path, capsys, topology, words):
  assert _compile(tmp_path, "configs/tiny.py", topology) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and words in err[0], err


# ---------------------------------------------------------------- pure parts
HLO = """
  %ag = bf16[512,128]{1,0} all-gather(%p), channel_id=1, dimensions={0}
  %ars = (f32[64]{0}, f32[8,8]{1,0}) all-reduce-start(%a, %b), channel_id=2
  %ard = (f32[64]{0}, f32[8,8]{1,0}) all-reduce-done(%ars)
  %cps = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(%c)
  %cpd = f32[4]{0} collective-permute-done(%cps)
  %rs = s8[16]{0} reduce-scatter(%d), dimensions={0}
  %not = f32[4]{0} add(%x, %y)
"""


def test_collectives_count_async_pairs_once_with_their_result_bytes():
  assert compile_report.collective_summary(HLO) == {
      "all-gather": {"count": 1, "bytes": 512 * 128 * 2},
      "all-reduce": {"count": 1, "bytes": (64 + 64) * 4},
      "collective-permute": {"count": 1, "bytes": 16},
      "reduce-scatter": {"count": 1, "bytes": 16}}
  assert max(c["elements"] for c in compile_report.collectives(HLO)) == 512 * 128


def test_fit_check_against_hbm():
  config = compose("tiny")
  memory = compile_report.Memory(arguments=6, outputs=4, aliased=4, temporaries=5, code=1)
  assert memory.total == 12
  compile_report.check_fit(memory, 12, config, "the train step")  # exactly full fits
  compile_report.check_fit(memory, None, config, "the train step")  # a CPU: nothing to check
  with pytest.raises(compile_report.DoesNotFitError, match="train.grad_accum_steps=1"):
    compile_report.check_fit(memory, 11, config, "the train step")


# ---------------------------------------------------------------- compilation cache
_TRAIN_TINY = """
import sys
sys.path.insert(0, {tests!r})
import standin
from esspr_jax import train
from esspr_jax.config import compose
config = compose("tiny")
config.train.steps = int(sys.argv[2])
config.train.batch_size = 8
config.train.schedule.warmup_steps = 1
train.train(config, sys.argv[1], model=standin.StandInModel(), loss_fn=standin.standin_loss,
            train_dataset=standin.dataset(8))
"""


def test_a_second_run_reuses_the_workdirs_compilation_cache(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(JAX_LOG_COMPILES="1", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             PYTHONPATH=str(REPO))
  script = _TRAIN_TINY.format(tests=str(REPO / "tests"))
  workdir = tmp_path / "run"

  def run(steps):
    done = subprocess.run([sys.executable, "-c", script, str(workdir), str(steps)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr

  first = run(2)
  cache = workdir / "compile_cache"
  entries = [p.name for p in cache.iterdir()]
  assert any("step_and_sum" in name for name in entries), entries
  assert "Persistent compilation cache hit for 'jit_step_and_sum'" not in first
  # The same run again, in a new process (a restarted job): it compiles the very same
  # step (set up before it finds the run finished), and reads it from the cache.
  second = run(2)
  assert "Persistent compilation cache hit for 'jit_step_and_sum'" in second
  assert sorted(p.name for p in cache.iterdir() if "step_and_sum" in p.name) == sorted(
      n for n in entries if "step_and_sum" in n)


def test_the_trainer_checks_the_fit_before_its_first_step():
  """train.set_up (what train() runs before step 1) on TPU devices: a step whose
  [B, B] scores cannot fit a v5e chip stops with DoesNotFitError naming the keys."""
  from esspr_jax import batch_layout, topology, train
  config = compose("tiny")
  config.train.batch_size = 131072  # 32768 query rows x 131072 columns of f32 per chip
  config.loss.chunk_size = 0
  model, loss_fn, views = train.default_model_and_loss(config)
  sample = batch_layout.abstract_train_batch(config, config.train.batch_size)
  with pytest.raises(compile_report.DoesNotFitError, match="train.batch_size=131072"):
    train.set_up(config, model, loss_fn, views, sample, devices=topology.devices("v5e:2x2"))
