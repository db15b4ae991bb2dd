"""Counted, logged skipping of bad input rows.

Every reader of user data (click logs, pair files, images) reports bad rows through a
`SkipCounter`: each skip is counted by reason and logged once per reason; `strict`
turns the first skip into a DataError naming file and row; `max_bad_fraction` stops a
run whose input is mostly garbage with a clear message instead of training on scraps.
"""
import collections
import logging

from esspr_jax.errors import DataError

log = logging.getLogger(__name__)


class SkipCounter:

  def __init__(self, what: str, strict: bool = False, max_bad_fraction: float = 1.0):
    self.what = what
    self.strict = strict
    self.max_bad_fraction = max_bad_fraction
    self.seen = 0
    self.reasons: collections.Counter = collections.Counter()

  @property
  def skipped(self) -> int:
    return sum(self.reasons.values())

  def ok(self) -> None:
    self.seen += 1

  def skip(self, reason: str, where: str, detail: str = "") -> None:
    """Records one bad row. `where` is 'file:row' so a person can find it."""
    self.seen += 1
    if self.strict:
      raise DataError(f"{self.what}: {where}: {reason}{': ' + detail if detail else ''}")
    if not self.reasons[reason]:
      log.warning("%s: skipping %s (%s)%s; further rows with this reason are only counted",
                  self.what, where, reason, ": " + detail if detail else "")
    self.reasons[reason] += 1

  def reclassify(self, reason: str, where: str, detail: str = "") -> None:
    """A row counted good (`ok`) that a later check rejects: counted bad instead."""
    self.seen -= 1
    self.skip(reason, where, detail)

  def check_fraction(self) -> None:
    """Raises if too much of the input was bad. Call at the end of a pass."""
    if self.seen and self.skipped / self.seen > self.max_bad_fraction:
      raise DataError(
          f"{self.what}: {self.skipped} of {self.seen} rows were bad "
          f"({self.skipped / self.seen:.1%} > max_bad_fraction={self.max_bad_fraction}); "
          f"reasons: {dict(self.reasons)}")

  def summary(self) -> dict:
    return {"rows": self.seen, "skipped": self.skipped, "by_reason": dict(self.reasons)}
