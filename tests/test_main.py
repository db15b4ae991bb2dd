"""The command line: overrides, bad keys, and the main job end to end (tiny config)."""
import pathlib
import types

import pytest
from absl import flags

from esspr_jax import main
from esspr_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")


def _parse(*args):
  argv = ["esspr_jax.main", *args]
  fv = flags.FlagValues()
  main.define_flags(fv, sys_argv=argv)
  main.parse_flags(argv, fv)
  return fv


def test_config_override_from_the_command_line(tmp_path):
  fv = _parse(f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.steps=7",
              "--config.train.mesh.tensor=2", "--mode=train")
  config = main.config_from_flags(fv)
  assert config.train.steps == 7
  assert config.train.mesh.tensor == 2
  assert fv.mode == "train"


def test_unknown_override_key_is_an_error(tmp_path):
  with pytest.raises(ConfigError, match=r"config.train.stpes: .*Did you mean \"steps\""):
    _parse(f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.stpes=3")


def test_unknown_flag_is_an_error(tmp_path):
  with pytest.raises(flags.Error, match="wrkdir"):
    _parse(f"--config={TINY}", f"--wrkdir={tmp_path}")


def test_invalid_value_names_the_key(tmp_path):
  fv = _parse(f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.steps=0")
  with pytest.raises(ConfigError, match="train.steps") as info:
    main.config_from_flags(fv)
  assert info.value.key == "train.steps"


def test_missing_workdir_is_an_error():
  fv = _parse(f"--config={TINY}")
  with pytest.raises(ConfigError, match="--workdir is required"):
    main.config_from_flags(fv)


def test_url_workdir_is_kept_and_its_data_dirs_are_local(tmp_path, monkeypatch):
  """A gs:// workdir stays a URL (not 'gs:/...'); the data it needs goes to a local
  per-config cache dir (tests/test_gcs_workdir.py runs it against a GCS emulator)."""
  monkeypatch.setenv("ESSPR_DATA_CACHE", str(tmp_path))
  fv = _parse(f"--config={TINY}", "--workdir=gs://bucket/runs/x/", "--mode=train")
  paths = main.Paths.of(main.config_from_flags(fv), fv)
  assert str(paths.workdir) == "gs://bucket/runs/x" and paths.data_per_host
  assert paths.world.parent == paths.data_dir.parent and paths.world.parent.parent == tmp_path
  fv = _parse(f"--config={TINY}", f"--workdir={tmp_path}", "--world_dir=gs://bucket/w")
  with pytest.raises(ConfigError, match="gs://bucket/w' is a URL") as info:
    main.Paths.of(main.config_from_flags(fv), fv)
  assert info.value.key == "--world_dir"


def test_mode_needs_its_flags(tmp_path):
  fv = _parse(f"--config={TINY}", f"--workdir={tmp_path}", "--mode=mine")
  with pytest.raises(ConfigError, match="--clicklog, --catalog, --out"):
    main.run(main.config_from_flags(fv), fv)


def test_main_returns_2_on_a_config_error(tmp_path, capsys, monkeypatch):
  fv = _parse(f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.batch_size=-1")
  monkeypatch.setattr(main.flags, "FLAGS", fv)
  assert main.main(["esspr_jax.main"]) == 2
  assert "config.train.batch_size" in capsys.readouterr().err


def test_main_job_runs_from_nothing_to_a_table(tmp_path, capsys):
  # Eval batch 24 > the 16 eval pairs: one batch, 8 padding rows, split over 8 devices.
  fv = _parse(f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.steps=2",
              "--config.train.checkpoint.every=1", "--config.eval.batch_size=24")
  result = main.run(main.config_from_flags(fv), fv)
  assert result.step == 2 and result.stopped == "done"
  out = capsys.readouterr().out
  for stage in ("[world] generated", "[mine]", "[build] train_pairs", "[build] eval_pairs",
                "[tokenizer]", "| m-m |", "done in"):
    assert stage in out, stage
  # The evaluation table's numbers came back through the hook.
  assert 0.0 < result.eval_metrics["m-m/mrr"] <= 1.0
  for path in ("world/manifest.json", "world/train_pairs.csv", "metrics.jsonl",
               "config.json", "checkpoints/2"):
    assert (tmp_path / path).exists(), path


def test_eval_uses_the_trainers_batch_sharding(tmp_path):
  import jax
  config = main.config_from_flags(_parse(f"--config={TINY}", f"--workdir={tmp_path}",
                                         "--config.eval.batch_size=24"))
  sharding = main.eval_batch_sharding(config)
  assert sharding.num_devices == jax.device_count() == 8
  assert sharding.shard_shape((24, 5)) == (3, 5)
  config.eval.batch_size = 12  # 12 rows do not split 8 ways: unsharded, not an error
  assert main.eval_batch_sharding(config) is None


def test_only_process_0_prepares_data_and_the_others_wait(tmp_path, monkeypatch):
  """--mode=all on a non-primary process: no preparation, the barrier, then training."""
  from esspr_jax.input import pipeline
  calls = []
  monkeypatch.setattr(main.distributed, "is_primary", lambda: False)
  monkeypatch.setattr(main, "prepare_data", lambda *a: calls.append("prepare"))
  monkeypatch.setattr(main.distributed, "barrier", lambda name: calls.append("barrier"))
  monkeypatch.setattr(pipeline, "tokenizer_from_config", lambda *a: calls.append("open") or "tok")
  trained = types.SimpleNamespace(stopped="done", step=0, checkpoint_dir=tmp_path,
                                  metrics_path=tmp_path / "metrics.jsonl")
  monkeypatch.setattr(main, "train",
                      lambda config, paths, tok: calls.append(("train", tok)) or trained)
  fv = _parse(f"--config={TINY}", f"--workdir={tmp_path}")
  main.run(main.config_from_flags(fv), fv)
  assert calls == ["barrier", "barrier", "open", ("train", "tok")]
  monkeypatch.setattr(main.distributed, "is_primary", lambda: True)
  calls.clear()
  main.run(main.config_from_flags(fv), fv)
  assert calls[:4] == ["prepare", "barrier", "open", "barrier"]


def test_library_logging_is_quiet_by_default_and_restorable():
  import logging
  from absl import logging as absl_logging
  fv = _parse(f"--config={TINY}")
  assert fv.log_level == "warning"
  try:
    main.configure_logging("warning")
    assert logging.getLogger("orbax").getEffectiveLevel() == logging.WARNING
    assert absl_logging.get_verbosity() == absl_logging.WARNING
    main.configure_logging("info")
    assert logging.getLogger("orbax").getEffectiveLevel() == logging.INFO
    assert absl_logging.get_verbosity() == absl_logging.INFO
  finally:
    main.configure_logging("warning")
