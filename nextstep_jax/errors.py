"""User-facing errors and warnings: one line naming the problem and the fix (the CLI prints them as they are).

`UserError` is what library edges raise for bad input; `os_error_line` turns ENOSPC/EROFS/EACCES/ENOTDIR (anywhere
in an exception's cause chain) into one line naming the path and what was kept; `warn` prints a one-line warning.
Importing it silences one harmless Orbax warning printed on every params load.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys


class _NoMissingMetadataWarning(logging.Filter):
  """Orbax warns on every load of a v1 pytree through the v0 reader (params_io, checkpoint metadata) that
  `state/_CHECKPOINT_METADATA` is absent (it lives one level up); the load is complete, so it is noise."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "Metadata file does not exist" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMissingMetadataWarning())


class UserError(ValueError):
  """Bad input or environment, described in one line (problem + fix); never shown with a traceback."""


class DamagedCheckpointError(UserError):
  """A checkpoint or model directory has a missing, truncated or corrupted file."""


_OS_FIXES = {
    errno.ENOSPC: "the disk is full; free space or choose another path",
    errno.EDQUOT: "the disk quota is exceeded; free space or choose another path",
    errno.EFBIG: "the file size limit is exceeded; free space, raise the limit or choose another path",
    errno.EROFS: "the file system is read-only; choose a writable path",
    errno.EACCES: "permission denied; choose a writable path or fix its permissions",
    errno.EPERM: "permission denied; choose a writable path or fix its permissions",
    errno.ENOTDIR: "a parent of it is a file, not a directory; choose another path",
}


def find_os_error(e: BaseException | None) -> OSError | None:
  """The first OSError with an errno we explain, following __cause__ / __context__ (Orbax and TensorStore wrap)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in _OS_FIXES:
      return e
    text = str(e)
    for code in _OS_FIXES:  # TensorStore reports errno only in its message
      if f"[OS error {code}]" in text or _errno_text(code) in text:
        return OSError(code, _errno_text(code), getattr(e, "filename", None))
    e = e.__cause__ or e.__context__
  return None


def _errno_text(code: int) -> str:
  return os.strerror(code)


def os_reason(e: OSError) -> str:
  """`<strerror> — <fix>`."""
  return f"{e.strerror or e} — {_OS_FIXES.get(e.errno, 'check the path')}"


def os_error_line(e: OSError, path: str | None = None, kept: str | None = None) -> str:
  """`writing PATH failed: <strerror> — <fix>[; <kept>]`."""
  line = f"writing {path or e.filename or 'the destination'} failed: {os_reason(e)}"
  return f"{line}; {kept}" if kept else line


def warn(message: str) -> None:
  """One warning line on stderr (flushed, so it interleaves with our other output)."""
  print(f"warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def native_stderr_hidden(hidden: bool = True):
  """Sends file descriptor 2 to /dev/null inside the block (C++ libraries such as libtpu write there directly,
  bypassing Python); our own lines still reach `sys.stderr` if it is not fd 2 (e.g. captured)."""
  if not hidden:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
