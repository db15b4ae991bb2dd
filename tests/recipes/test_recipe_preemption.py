"""A recipe preempted during training stops there (25.16): no evaluation of the
half-trained model, no results table, the exit code of a preempted `--mode=train`.
The preempted recipe runs in a subprocess: this file, run as a script, is a recipe
that trains the stand-in model through `recipes.training.train_or_stop`, then "evaluates"."""
import os
import pathlib
import signal
import subprocess
import sys
import time

TESTS = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))
ROWS = 8


def _config(steps):
  from esspr_jax.config import compose
  config = compose("tiny")
  config.train.steps = steps
  config.train.batch_size = ROWS
  config.train.schedule.warmup_steps = 1
  config.train.log_every = 1
  config.train.checkpoint.every = 1000  # the first save and the preemption save only
  config.train.eval_at_end = False
  return config


def _recipe(workdir: str, steps: int, delay: float) -> None:
  """Train, then what a recipe does with the trained params: here, a results file."""
  import standin
  from esspr_jax.recipes import training
  result = training.train_or_stop(_config(steps), workdir, model=standin.StandInModel(),
                                  loss_fn=standin.standin_loss,
                                  train_dataset=standin.dataset(ROWS, delay=delay))
  (pathlib.Path(workdir) / "results.md").write_text(f"{result.step} steps\n")
  print("RECIPE evaluated", flush=True)


if __name__ == "__main__":
  _recipe(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
  sys.exit(0)

from esspr_jax import cli  # noqa: E402


def _logged_steps(workdir: pathlib.Path) -> int:
  path = workdir / "metrics.jsonl"
  text = path.read_text() if path.exists() else ""
  return sum('"kind": "train"' in line for line in text.splitlines())


def test_a_preempted_recipe_stops_without_evaluating(tmp_path):
  env = {**os.environ, "PYTHONPATH": str(TESTS.parent) + os.pathsep + os.environ.get(
      "PYTHONPATH", "")}
  process = subprocess.Popen([sys.executable, __file__, str(tmp_path), "2000", "0.3"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
  deadline = time.time() + 300
  while _logged_steps(tmp_path) < 1:
    assert process.poll() is None, process.stdout.read()
    assert time.time() < deadline, "the recipe never logged a step"
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  out, _ = process.communicate(timeout=300)
  assert process.returncode == cli.EXIT_PREEMPTED, out[-3000:]
  assert "RECIPE evaluated" not in out and not (tmp_path / "results.md").exists()
  stopped = out.split("stopped by a preemption signal at step ")[1]
  step = int(stopped.split()[0])
  assert 1 <= step < 2000 and (tmp_path / "checkpoints" / str(step)).is_dir()


def test_after_training_the_signal_handlers_are_the_processes_own(tmp_path):
  def own(signum, frame):
    del signum, frame
  previous = signal.signal(signal.SIGTERM, own)
  try:
    _recipe(str(tmp_path), 2, 0.0)
    assert signal.getsignal(signal.SIGTERM) is own
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert (tmp_path / "results.md").read_text() == "2 steps\n"

