"""The paper-format eval: MRR and Recall@K per setting x-y over annotated pairs.

Entry points (signatures the trainer and main.py rely on):

    evaluate(model, params, batches, config, workdir=None, step=None, *,
             batch_sharding=None, tensorboard=True) -> EvalReport
        Embeds every trigger and recall of `batches` (eval loader batches with the
        `valid` mask and `trigger_id`/`recall_id`), scores the settings of
        config.eval.settings that the model can serve, prints the table and (primary
        process, if `workdir`) writes <workdir>/eval/eval_step_<N>.{md,json} and
        eval_step_<N>_recall_at_k.png, latest.{md,json}, and TensorBoard scalars
        `eval/<x-y>/{mrr,recall_at_K}` under <workdir>/tensorboard.

    make_eval_hook(config, workdir, model, batches_fn=None, *, batch_sharding=None)
        -> eval_fn(params, step) -> {'<x-y>/mrr': ..., '<x-y>/recall_at_K': ...}
        The trainer's periodic eval (train.py `eval_fn`). `batches_fn()` returns a
        fresh iterable of eval batches (default: the run's eval dataset,
        pipeline.eval_dataset). It writes files but leaves TensorBoard to the trainer's
        metric writer (which logs the returned scalars under `eval/`).

    eval_hook(config, workdir, model, batches_fn=None, *, batch_sharding=None)
        -> hooks.EvalHook   (train.py `hooks`; stages.training_hooks builds it)
        make_eval_hook's function every eval.every_steps steps and at the end.

    evaluate_checkpoint(config, workdir, *, checkpoint=None, step=None, data_dir=None)
        -> EvalReport        (main.py --mode=eval)
        Restores params from <workdir>/checkpoints (or `checkpoint`, a run dir or a
        checkpoints dir), refusing one trained with another model config.

Protocol details (queries, gallery, ignored items, ties, ScaNN vs exact) are in
scoring.py and docs/retrieval.md. With `eval.hybrid.enabled` the table gets a row
`<x-y>+lex` per `eval.hybrid.settings`: the dense scores fused with title TF-IDF
(scoring.score_hybrid); the titles come from the batches' `trigger_title` /
`recall_title` (the eval loader provides them).
"""
import dataclasses
import logging
import pathlib
import sys
import time
from typing import Callable, Iterable

import numpy as np
from etils import epath

from esspr_jax import hooks
from esspr_jax.config import eval as eval_config
from esspr_jax.errors import DataError
from esspr_jax.retrieval import embed as embed_lib
from esspr_jax.retrieval import report as report_lib
from esspr_jax.retrieval import scoring

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EvalReport:
  results: list            # [scoring.SettingResult]
  scalars: dict            # {'m-m/mrr': ...}
  table: str               # Markdown table
  paths: dict              # written files (empty if none)
  meta: dict


def servable_settings(config, available) -> tuple[str, ...]:
  """The configured settings whose two modalities the model has (others logged, skipped)."""
  wanted = eval_config.parse_settings(config.eval.settings)
  ok = tuple(s for s in wanted if all(m in available for m in s.split("-")))
  skipped = [s for s in wanted if s not in ok]
  if skipped:
    log.info("eval: skipping settings %s (the model has only %s)", skipped, tuple(available))
  if not ok:
    raise DataError(f"none of the eval settings {wanted} can be served by a model with "
                    f"modalities {tuple(available)}")
  return ok


def _is_primary() -> bool:
  import jax  # noqa: PLC0415
  return jax.process_index() == 0


class _TitleTap:
  """Passes batches through, keeping the valid rows' titles of both sides."""

  def __init__(self, batches: Iterable[dict]):
    self.batches = batches
    self.titles = {"trigger": [], "recall": []}

  def __iter__(self):
    for batch in self.batches:
      valid = np.asarray(batch["valid"], bool) if "valid" in batch else None
      for side in self.titles:
        key = f"{side}_title"
        if key not in batch:
          raise DataError(f"eval.hybrid.enabled needs '{key}' in the eval batches (the eval "
                          f"loader provides it); this batch has {sorted(batch)}")
        titles = np.asarray(batch[key], dtype=object)
        self.titles[side].extend(str(t) for t in (titles if valid is None else titles[valid]))
      yield batch


def _hybrid_settings(config, settings) -> tuple[str, ...]:
  """eval.hybrid.settings the run can serve (their dense setting is being scored)."""
  wanted = eval_config.parse_hybrid_settings(config.eval.hybrid.settings)
  ok = tuple(s for s in wanted if s in settings)
  if len(ok) < len(wanted):
    log.info("eval: hybrid rows only for %s (dense settings served: %s)", ok, settings)
  return ok


def evaluate(model, params, batches: Iterable[dict], config, workdir=None, step=None, *,
             batch_sharding=None, tensorboard: bool = True, console=None) -> EvalReport:
  """See module doc."""
  start = time.perf_counter()
  settings = servable_settings(config, getattr(model, "available", ("i", "t", "m")))
  modalities = tuple(m for m in ("i", "t", "m") if any(m in s.split("-") for s in settings))
  hybrid = _hybrid_settings(config, settings) if config.eval.hybrid.enabled else ()
  tap = _TitleTap(batches) if hybrid else None
  ids, emb = embed_lib.embed_all(model, params, tap or batches, ("trigger", "recall"),
                                 modalities, batch_sharding=batch_sharding)
  for side in ("trigger", "recall"):
    if np.any(ids[side] == ""):
      raise DataError(f"eval batches need non-empty '{side}_id' for every valid row (the "
                      f"gallery is built from the ids); the eval loader provides them")
  trigger_ids, trigger_emb = embed_lib.allgather_rows(ids["trigger"], emb["trigger"])
  recall_ids, recall_emb = embed_lib.allgather_rows(ids["recall"], emb["recall"])
  titles = {}
  if tap is not None:  # strings travel like ids (every process's rows, in the same order)
    titles = {side: embed_lib.allgather_rows(np.asarray(t, dtype=str), {})[0]
              for side, t in tap.titles.items()}
  if config.eval.max_pairs:
    n = config.eval.max_pairs
    trigger_ids, recall_ids = trigger_ids[:n], recall_ids[:n]
    trigger_emb = {m: v[:n] for m, v in trigger_emb.items()}
    recall_emb = {m: v[:n] for m, v in recall_emb.items()}
    titles = {side: t[:n] for side, t in titles.items()}
  embed_s = time.perf_counter() - start
  layout = scoring.layout_pairs(trigger_ids, recall_ids)
  results = scoring.score_settings(trigger_emb, recall_emb, layout, settings, config.eval)
  if hybrid:
    results += scoring.score_hybrid(trigger_emb, recall_emb, layout, titles["trigger"],
                                    titles["recall"], hybrid, config.eval)
  ks = tuple(config.eval.ks)
  table = report_lib.markdown_table(results, ks)
  meta = {"step": step, "pairs": layout.num_pairs, "gallery": len(layout.gallery_ids),
          "embed_seconds": embed_s, "seconds": time.perf_counter() - start,
          "settings": list(settings)}
  paths = {}
  if _is_primary():
    out = console or sys.stdout
    print(f"\neval{'' if step is None else f' at step {step}'}: {layout.num_pairs} pairs, "
          f"gallery {len(layout.gallery_ids)}, {meta['seconds']:.1f}s\n{table}", file=out, flush=True)
    if workdir is not None:
      workdir = epath.Path(workdir)  # local or gs://; the writers handle both
      paths = report_lib.write_eval_reports(results, ks, workdir / "eval", step, meta)
      if tensorboard:
        report_lib.write_tensorboard(results, workdir / "tensorboard", step)
  return EvalReport(results, report_lib.scalars(results), table, paths, meta)


def make_eval_hook(config, workdir, model, batches_fn: Callable[[], Iterable[dict]] | None = None,
                   *, batch_sharding=None) -> Callable:
  """The trainer's `eval_fn(params, step) -> scalars` (see module doc)."""
  if batches_fn is None:
    def batches_fn():
      from esspr_jax.input import pipeline  # noqa: PLC0415
      return pipeline.eval_dataset(config, config.eval.batch_size,
                                   data_dir=_data_dir(config, workdir))

  def eval_fn(params, step):
    return evaluate(model, params, batches_fn(), config, workdir, step,
                    batch_sharding=batch_sharding, tensorboard=False).scalars

  return eval_fn


def eval_hook(config, workdir, model, batches_fn: Callable[[], Iterable[dict]] | None = None,
              *, batch_sharding=None) -> hooks.EvalHook:
  """The train loop's eval hook (see module doc)."""
  return hooks.EvalHook.from_config(
      config, make_eval_hook(config, workdir, model, batches_fn, batch_sharding=batch_sharding))


def _data_dir(config, workdir) -> pathlib.Path:
  """config.data.pipeline.data_dir, or <workdir>/tfds when it is empty (a local cache
  dir for a gs:// workdir: esspr_jax/workdir.py)."""
  from esspr_jax import workdir as workdir_lib  # noqa: PLC0415
  return workdir_lib.default_data_dir(config, workdir)


def evaluate_checkpoint(config, workdir, *, checkpoint=None, step=None, data_dir=None,
                        batches: Iterable[dict] | None = None) -> EvalReport:
  """main.py --mode=eval: restore params, evaluate on the run's eval dataset."""
  from esspr_jax.retrieval import restore  # noqa: PLC0415
  model, params, info = restore.load_model_and_params(config, checkpoint or workdir, step=step)
  if batches is None:
    from esspr_jax.input import pipeline  # noqa: PLC0415
    batches = pipeline.eval_dataset(config, config.eval.batch_size,
                                    data_dir=data_dir or _data_dir(config, workdir))
  report = evaluate(model, params, batches, config, workdir, info["step"])
  report.meta["checkpoint"] = info["checkpoint"]
  return report
