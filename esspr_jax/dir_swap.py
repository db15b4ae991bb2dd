"""Putting a finished directory in place of another in one step, so that a reader (or a
run killed mid-way) never finds the place empty or half replaced.

    swap_in(new, final)

`final` becomes what `new` holds. On Linux the two are exchanged with
renameat2(RENAME_EXCHANGE): one atomic step, after which the old contents sit at `new`
and are removed. A kill after the exchange leaves them there, under the caller's
temporary name, which the caller cleans on its next run. Where the kernel or the
filesystem cannot exchange (other systems, some network filesystems) the old directory
is renamed aside first: a short window without `final`.
"""
import ctypes
import errno
import logging
import os
import pathlib
import shutil

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)


def _renameat2():
  try:
    fn = ctypes.CDLL(None, use_errno=True).renameat2
  except (AttributeError, OSError):
    return None
  fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
  return fn


_EXCHANGE = _renameat2()


def exchange(a, b) -> bool:
  """Swaps two existing paths atomically; False where the system cannot."""
  if _EXCHANGE is None:
    return False
  if _EXCHANGE(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  code = ctypes.get_errno()
  if code in _UNSUPPORTED:
    return False
  raise OSError(code, f"exchanging {a} and {b}: {os.strerror(code)}")


def swap_in(new, final) -> None:
  """Moves the finished directory `new` to `final`, replacing what was there."""
  new, final = pathlib.Path(new), pathlib.Path(final)
  if not os.path.lexists(final):
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(new, final)
    return
  if exchange(new, final):
    shutil.rmtree(new, ignore_errors=True)
    return
  log.info("%s: no atomic exchange here; replacing it by two renames", final)
  old = final.with_name(f"{final.name}.old-{os.getpid()}")
  os.replace(final, old)
  os.replace(new, final)
  shutil.rmtree(old, ignore_errors=True)
