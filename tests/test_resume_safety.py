"""Resuming safely: a changed config under a checkpoint (esspr_jax/run_record.py) and a
truncated newest checkpoint (Checkpointer.restore_latest), through train.train with the
stand-in model."""
import json
import logging
import pathlib
import sys

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import standin  # noqa: E402
from support import set_dotted  # noqa: E402

from esspr_jax import jsonl, run_record, train  # noqa: E402
from esspr_jax.config import compose  # noqa: E402
from esspr_jax.errors import ConfigError  # noqa: E402


def _config(steps, **changes):
  config = compose("tiny")
  config.train.steps = steps
  config.train.batch_size = 8
  config.train.schedule.warmup_steps = 1
  config.train.log_every = 1
  config.train.checkpoint.every = 2
  return set_dotted(config, changes)


def _train(config, workdir):
  return train.train(config, workdir, model=standin.StandInModel(),
                     loss_fn=standin.standin_loss, train_dataset=standin.dataset(8))


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
  """A finished 2-step run (checkpoint 2) to copy and resume."""
  workdir = tmp_path_factory.mktemp("two_steps")
  _train(_config(2), workdir)
  return workdir


def _copy(run, tmp_path):
  import shutil
  shutil.copytree(run, tmp_path / "run")
  (tmp_path / "run" / ".esspr-run.lock").unlink(missing_ok=True)
  return tmp_path / "run"


# ------------------------------------------------------------------ 13.6 changed config
def test_resume_with_a_changed_model_or_data_shape_names_the_keys(two_step_run, tmp_path):
  workdir = _copy(two_step_run, tmp_path)
  before = (workdir / "config.json").read_text()
  changed = _config(4, model__embed_dim=64, train__batch_size=16)
  with pytest.raises(ConfigError) as info:
    _train(changed, workdir)
  message = str(info.value)
  assert "model.embed_dim: 32 -> 64" in message and "train.batch_size: 8 -> 16" in message
  assert "train.steps" not in message  # allowed changes are not the problem
  assert (workdir / "config.json").read_text() == before
  assert not (workdir / run_record.HISTORY).exists()


def test_resume_with_a_new_optimizer_schedule_and_steps_is_recorded_not_overwritten(
    two_step_run, tmp_path, caplog):
  workdir = _copy(two_step_run, tmp_path)
  before = (workdir / "config.json").read_text()
  changed = _config(4, train__optimizer__learning_rate=5e-4,
                    train__schedule__name="warmup_constant")
  with caplog.at_level(logging.WARNING, logger="esspr_jax.run_record"):
    result = _train(changed, workdir)
  assert result.resumed_from == 2 and result.step == 4
  assert (workdir / "config.json").read_text() == before  # the original, unchanged
  [entry] = jsonl.read_jsonl(workdir / run_record.HISTORY)
  assert entry["resumed_at_step"] == 2
  assert entry["changes"] == {
      "train.optimizer.learning_rate": {"from": 1e-3, "to": 5e-4},
      "train.schedule.name": {"from": "warmup_cosine", "to": "warmup_constant"},
      "train.steps": {"from": 2, "to": 4}}
  assert "train.optimizer.learning_rate" in caplog.text
  # The saved config is now the changed one: the same resume again records nothing new,
  assert run_record.saved_config(workdir) == json.loads(json.dumps(changed.to_dict()))
  assert run_record.reconcile_config(workdir, changed, resuming=True, step=4) == {}
  assert len(jsonl.read_jsonl(workdir / run_record.HISTORY)) == 1
  # and a model change is still judged against the original model.
  with pytest.raises(ConfigError, match="model.text.depth: 1 -> 2"):
    run_record.reconcile_config(workdir, _config(6, model__text__depth=2), resuming=True)


def test_which_keys_may_change_on_resume():
  for key in ("model.embed_dim", "model.image.size", "model.tokenizer.max_len", "seed",
              "train.batch_size", "data.pipeline.train_dataset", "data.world.num_styles"):
    assert run_record.is_fixed(key), key
  assert run_record._switches_composed("loss.composed.weight", 0.0, 0.1)
  assert not run_record._switches_composed("loss.composed.weight", 0.1, 0.5)
  # uncertainty weighting learns one log-variance per enabled term (a params shape)
  switches = run_record._switches_loss_params
  assert switches("loss.weighting.kind", "fixed", "uncertainty", "uncertainty")
  assert switches("loss.weighting.kind", "uncertainty", "fashionbert", "fashionbert")
  assert not switches("loss.weighting.kind", "fixed", "fashionbert", "fashionbert")
  assert switches("loss.pairs.t_t.weight", 0.0, 1.0, "uncertainty")
  assert switches("loss.plc.t.weight", 0.5, 0.0, "uncertainty")
  assert not switches("loss.pairs.t_t.weight", 0.5, 1.0, "uncertainty")
  assert not switches("loss.pairs.t_t.weight", 0.0, 1.0, "fixed")
  for key in ("train.steps", "train.optimizer.learning_rate", "train.schedule.warmup_steps",
              "train.log_every", "eval.every_steps", "model.remat", "data.pipeline.prefetch",
              "model.image.init_from.path", "train.batch_size_extra"):
    assert not run_record.is_fixed(key), key


# ------------------------------------------------------------------ 13.7 corrupt checkpoint
def _truncate_arrays(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """Cuts every array chunk file of a checkpoint's state in half (a disk that filled)."""
  chunks = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  for path in chunks:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
  return chunks


def test_a_truncated_newest_checkpoint_falls_back_to_the_one_before(two_step_run, tmp_path,
                                                                    caplog):
  workdir = _copy(two_step_run, tmp_path)
  steps = lambda: sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()  # noqa: E731
                         if p.name.isdigit())
  assert steps() == [1, 2]  # Orbax also keeps the first step
  assert _truncate_arrays(workdir / "checkpoints" / "2")
  with caplog.at_level(logging.WARNING, logger="esspr_jax.checkpoint"):
    result = _train(_config(3), workdir)
  assert result.resumed_from == 1 and result.step == 3
  assert str(workdir / "checkpoints" / "2") in caplog.text  # names the bad one
  aside = list((workdir / "checkpoints.corrupt").iterdir())
  assert [p.name.split("-")[0] for p in aside] == ["2"]
  assert steps() == [1, 2, 3]  # step 2 saved afresh
  # None restoring is a DataError naming each, and nothing is moved.
  from esspr_jax import checkpoint
  from esspr_jax.errors import DataError
  for step in (1, 2, 3):
    _truncate_arrays(workdir / "checkpoints" / str(step))
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", every=2, keep=3, async_save=False)
  # (abstract state None: restore as saved, so only the damage can fail it)
  with pytest.raises(DataError, match=r"no checkpoint in .* restores: .*checkpoints/3: "
                     r".*OUT_OF_RANGE.*checkpoints/1: "):
    ckpt.restore_latest(None, iter(standin.dataset(8)))
  assert steps() == [1, 2, 3]
  ckpt.close()


def test_resume_refuses_switching_uncertainty_weighting(two_step_run, tmp_path):
  workdir = _copy(two_step_run, tmp_path)
  with pytest.raises(ConfigError, match="loss.weighting.kind: 'fixed' -> 'uncertainty'"):
    run_record.reconcile_config(workdir, _config(4, loss__weighting__kind="uncertainty"),
                                resuming=True)


# ------------------------------------------------------------------ 25.9 rebuilt dataset
def _build_train_dataset(config, workdir, pairs):
  """The run's train dataset in <workdir>/tfds, built from `pairs` (rows of two ids)."""
  from support import write_jpeg  # noqa: PLC0415  (with the helper below)
  from esspr_jax.input import esspr_tfds  # noqa: PLC0415  (TensorFlow Datasets: this test only)
  images = workdir / "images"
  images.mkdir(parents=True, exist_ok=True)
  rows = []
  for n, (a, b) in enumerate(pairs):
    for item in (a, b):
      write_jpeg(images / f"{item}.jpg", (40 * n % 255, 80, 120))
    rows.append(f"X,Y,{a},title {a},{b},title {b},{a}.jpg,{b}.jpg,1\n")
  csv = workdir / f"pairs_{len(pairs)}.csv"
  csv.write_text("cate_lv1_name,cate_name,trigger_id,trigger_title,recall_id,recall_title,"
                 "trigger_img,recall_img,label\n" + "".join(rows))
  esspr_tfds.build_from_config(config, csv, images, config.data.pipeline.train_dataset,
                               data_dir=workdir / "tfds")
  return csv


def test_resume_on_a_train_dataset_rebuilt_from_other_pairs_is_refused(tmp_path):
  """A build between two runs replaced the dataset: the checkpoint's data position would
  point into other data, so the resume stops naming the dataset (a moved workdir, the
  same pairs, resumes)."""
  workdir = tmp_path / "run"
  _build_train_dataset(_config(2), workdir, [("a", "b"), ("c", "d")])
  _train(_config(2), workdir)
  recorded = json.loads((workdir / run_record.DATASET).read_text())
  assert recorded["name"] == _config(2).data.pipeline.train_dataset
  moved = tmp_path / "moved"
  workdir.rename(moved)
  assert _train(_config(3), moved).resumed_from == 2  # same pairs elsewhere: resumes
  new_csv = _build_train_dataset(_config(3), moved, [("a", "b"), ("c", "d"), ("e", "f")])
  with pytest.raises(ConfigError) as info:
    _train(_config(5), moved)
  message = str(info.value)
  assert message.startswith("config.data.pipeline.train_dataset: cannot resume the run in ")
  assert f"'{recorded['name']}'" in message and str(new_csv) in message
  assert "new --workdir" in message and "\n" not in message
  assert sorted(p.name for p in (moved / "checkpoints").iterdir() if p.name.isdigit())[-1] == "3"
