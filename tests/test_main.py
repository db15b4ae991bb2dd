"""The command line: overrides, bad keys, and the main job end to end (tiny config)."""
import pathlib

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
  fv = _parse(f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.steps=2",
              "--config.train.checkpoint.every=1")
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
