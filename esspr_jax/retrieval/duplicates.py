"""Duplicate detection, the scoring half: precision / recall / F1 of a cosine threshold
over labelled pairs, and the threshold calibrated to a target precision.

A pair is called a duplicate when its score is >= the threshold. The sweep is exact:
the pairs are sorted by score once and counted cumulatively, and every distinct score
is one threshold (tied pairs are all in or all out: a threshold cannot split them).

    sweep(scores, labels) -> Sweep          every distinct score, descending
    calibrate(scores, labels, target) -> Calibration
        the smallest threshold whose precision >= target (the most recall at that
        precision); `reached=False` and `threshold=None` when no threshold gets there
    at_threshold(scores, labels, t) -> Point    precision / recall / F1 at a given t

Pure functions of NumPy arrays; clustering a catalog is duplicates_clusters.py, the
main job's --mode=duplicates is duplicates_stage.py.
"""
import dataclasses

import numpy as np

from esspr_jax.errors import DataError

# Precision compared with this slack, so 19/20 meets a target of 0.95 whatever the
# rounding of either side.
_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class Point:
  """One operating point: pairs scored >= threshold are called duplicates."""
  threshold: float | None
  tp: int
  fp: int
  positives: int

  @property
  def fn(self) -> int:
    return self.positives - self.tp

  @property
  def precision(self) -> float:
    """NaN where nothing is called a duplicate (precision is undefined there)."""
    called = self.tp + self.fp
    return self.tp / called if called else float("nan")

  @property
  def recall(self) -> float:
    return self.tp / self.positives

  @property
  def f1(self) -> float:
    return 2 * self.tp / (self.tp + self.fp + self.positives)

  def as_dict(self) -> dict:
    p = self.precision
    return {"threshold": self.threshold, "precision": None if np.isnan(p) else p,
            "recall": self.recall, "f1": self.f1, "tp": self.tp, "fp": self.fp, "fn": self.fn}


@dataclasses.dataclass(frozen=True)
class Sweep:
  """Counts at every distinct score, thresholds descending (so tp and fp only grow)."""
  thresholds: np.ndarray   # float64 [T]
  tp: np.ndarray           # int64 [T]: positives scored >= thresholds[j]
  fp: np.ndarray           # int64 [T]: negatives scored >= thresholds[j]
  positives: int
  negatives: int

  @property
  def precision(self) -> np.ndarray:
    return self.tp / (self.tp + self.fp)

  @property
  def recall(self) -> np.ndarray:
    return self.tp / self.positives

  @property
  def f1(self) -> np.ndarray:
    return 2 * self.tp / (self.tp + self.fp + self.positives)

  def point(self, j: int) -> Point:
    return Point(float(self.thresholds[j]), int(self.tp[j]), int(self.fp[j]), self.positives)

  def best_f1(self) -> Point:
    """The threshold of highest F1 (the larger threshold on a tie)."""
    return self.point(int(np.argmax(self.f1)))


@dataclasses.dataclass(frozen=True)
class Calibration:
  target_precision: float
  reached: bool
  point: Point             # the chosen threshold's point; where not reached, the
                           # threshold of highest precision (for the report only)
  message: str

  @property
  def threshold(self) -> float | None:
    return self.point.threshold if self.reached else None

  def as_dict(self) -> dict:
    return {"target_precision": self.target_precision, "reached": self.reached,
            "threshold": self.threshold, "message": self.message,
            ("at_threshold" if self.reached else "best_precision_point"): self.point.as_dict()}


def check_pairs(scores, labels) -> tuple[np.ndarray, np.ndarray]:
  """(float64 scores, bool labels); a clear error for NaN, bad labels, or no positives
  or no negatives (precision is then meaningless)."""
  s = np.asarray(scores, np.float64)
  y = np.asarray(labels)
  if s.ndim != 1 or y.shape != s.shape:
    raise DataError(f"duplicate pairs: want one score and one label per pair, got scores of "
                    f"shape {s.shape} and labels of shape {y.shape}")
  bad = np.flatnonzero(~np.isfinite(s))
  if len(bad):
    raise DataError(f"duplicate pairs: {len(bad)} scores are NaN or inf (first at pair "
                    f"{int(bad[0])}); the embeddings behind them are broken")
  if y.dtype != bool:
    wrong = np.flatnonzero((y != 0) & (y != 1))
    if len(wrong):
      raise DataError(f"duplicate pairs: labels must be 0 or 1, pair {int(wrong[0])} has "
                      f"{y[wrong[0]]!r}")
    y = y.astype(bool)
  if not y.any():
    raise DataError(f"duplicate pairs: none of the {len(y)} pairs is labelled 1 (a duplicate); "
                    "precision and recall need positives")
  if y.all():
    raise DataError(f"duplicate pairs: none of the {len(y)} pairs is labelled 0 (not a "
                    "duplicate); with positives only every threshold has precision 1, so a "
                    "calibration would cluster everything")
  return s, y


def sweep(scores, labels) -> Sweep:
  """Exact counts at every distinct score (sort once, cumulative sums)."""
  s, y = check_pairs(scores, labels)
  order = np.argsort(-s, kind="stable")
  s, y = s[order], y[order]
  tp, fp = np.cumsum(y, dtype=np.int64), np.cumsum(~y, dtype=np.int64)
  last = np.flatnonzero(np.append(s[1:] != s[:-1], True))   # the end of each tie group
  return Sweep(s[last], tp[last], fp[last], int(y.sum()), int((~y).sum()))


def calibrate(scores, labels, target_precision: float) -> Calibration:
  """The smallest threshold whose precision >= target_precision (see module doc)."""
  if not 0 < target_precision <= 1:
    raise DataError(f"target precision must be in (0, 1], got {target_precision!r}")
  sw = sweep(scores, labels)
  ok = np.flatnonzero(sw.precision >= target_precision - _EPS)
  if len(ok):
    point = sw.point(int(ok[-1]))
    return Calibration(target_precision, True, point,
                       f"threshold {point.threshold:.4f} reaches precision "
                       f"{point.precision:.4f} >= {target_precision} at recall {point.recall:.4f}")
  best = sw.point(int(np.argmax(sw.precision)))
  return Calibration(target_precision, False, best,
                     f"no threshold reaches precision {target_precision} on these "
                     f"{sw.positives + sw.negatives} pairs: the best is {best.precision:.4f} "
                     f"(at threshold {best.threshold:.4f}); no threshold was chosen")


def at_threshold(scores, labels, threshold: float) -> Point:
  """Precision / recall / F1 when pairs scored >= threshold are called duplicates."""
  if threshold is None or not np.isfinite(threshold):
    raise DataError(f"duplicate threshold must be a finite number, got {threshold!r}")
  s, y = check_pairs(scores, labels)
  called = s >= threshold
  return Point(float(threshold), int((called & y).sum()), int((called & ~y).sum()),
               int(y.sum()))
