"""Path arguments at the edge: resolved once (relative to the working directory), checked for writability early.

`resolve` leaves URLs (gs://…) alone; `check_writable` finds the nearest existing ancestor of an output path and
proves it is a writable directory (a probe file is created and removed), before any expensive work starts;
`atomic_dir` writes a directory into a temporary sibling and renames it into place at the end.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from nextstep_jax.errors import UserError, os_reason

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"  # the repo's experiment files


def is_url(path: str | os.PathLike) -> bool:
  return "://" in str(path)


def resolve(path: str | os.PathLike | None) -> str | None:
  """Absolute local path (`~` expanded) or the URL unchanged; None stays None."""
  if path is None or is_url(path):
    return None if path is None else str(path)
  return os.path.abspath(os.path.expanduser(os.fspath(path)))


def resolve_path(path: str | os.PathLike) -> Path:
  """`resolve` as a `pathlib.Path` (local paths only)."""
  return Path(resolve(path))


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
  """Raises UserError (one line) unless `path` can be created or written: its nearest existing ancestor must be a
  writable directory. An existing `path` that is a directory must itself be writable."""
  if is_url(path):
    return
  target = Path(resolve(path))
  probe_dir = target if target.is_dir() else None
  if probe_dir is None:
    anc = target.parent
    while not anc.exists() and anc != anc.parent:
      anc = anc.parent
    if not anc.is_dir():
      raise UserError(f"{what} {target}: {anc} is a file, not a directory; choose another path")
    probe_dir = anc
  try:
    fd, probe = tempfile.mkstemp(prefix=".nextstep-write-check-", dir=probe_dir)
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise UserError(f"{what} {target} is not writable ({probe_dir}: {os_reason(e)})") from None


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = False):
  """Yields a temporary sibling `.<name>.partial` to write the directory `dst` into; renamed to `dst` only when
  the block succeeds (a failed or killed run leaves `dst` as it was; the rerun discards the partial copy)."""
  dst = resolve_path(dst)
  if dst.exists() and not overwrite:
    raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it, or choose another destination")
  tmp, old = dst.with_name(f".{dst.name}.partial"), dst.with_name(f".{dst.name}.old")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.parent.mkdir(parents=True, exist_ok=True)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if dst.exists():
    shutil.rmtree(old, ignore_errors=True)
    os.replace(dst, old)
  os.replace(tmp, dst)
  shutil.rmtree(old, ignore_errors=True)
