"""What every recipe does around `train.train`: a preempted run stops the recipe."""
from esspr_jax import train as train_lib
from esspr_jax.cli import EXIT_PREEMPTED


def train_or_stop(config, workdir, **train_kwargs) -> train_lib.TrainResult:
  """`train.train(config, workdir, **train_kwargs)`, for a recipe: a run that a
  preemption signal stopped (its step saved) ends the recipe here, with the exit code
  of a preempted `esspr-jax --mode=train`. Evaluating the half-trained model would
  report it as the recipe's result; the same command resumes the training instead."""
  result = train_lib.train(config, workdir, **train_kwargs)
  if result.stopped == "preempted":
    print(f"\nstopped by a preemption signal at step {result.step} of {config.train.steps} "
          f"(saved in {result.checkpoint_dir}); run the same command again to resume.",
          flush=True)
    raise SystemExit(EXIT_PREEMPTED)
  return result
