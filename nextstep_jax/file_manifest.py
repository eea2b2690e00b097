"""Sizes and CRC-32s of every file under a directory, written when it is complete and checked before it is trusted.

A manifest is JSON {"files": {relative path: [size, crc32]}, ...extra}. `verify` names the first file that is
missing, has another size, or other contents — what a disk error or a partial copy leaves. Contents are compared
for directories up to CHECKSUM_LIMIT_BYTES (re-reading a 14B-model checkpoint would cost minutes); larger ones
get size checks, and the reader's own errors are still turned into one line by the caller.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

_CHUNK = 4 << 20
CHECKSUM_LIMIT_BYTES = 4 << 30


def crc32(path: Path) -> int:
  value = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      value = zlib.crc32(chunk, value)
  return value


def scan(root: Path, skip: tuple[str, ...] = ()) -> dict[str, list[int]]:
  """{relative path: [size, crc32]} of the files under `root` (names in `skip` left out)."""
  out = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      if name in skip:
        continue
      p = Path(dirpath) / name
      out[str(p.relative_to(root))] = [p.stat().st_size, crc32(p)]
  return dict(sorted(out.items()))


def write(manifest: Path, root: Path, skip: tuple[str, ...] = (), **extra: Any) -> None:
  """Atomically writes the manifest of `root` (tmp file + rename)."""
  tmp = manifest.with_name(manifest.name + ".tmp")
  tmp.write_text(json.dumps(dict(extra, files=scan(root, skip))))
  os.replace(tmp, manifest)


def read(manifest: Path) -> dict[str, Any] | None:
  """The manifest, or None if absent or unreadable (an unverifiable directory)."""
  try:
    return json.loads(manifest.read_text())
  except (OSError, ValueError):
    return None


def verify(root: Path, files: dict[str, list[int]], checksums: bool | None = None) -> str | None:
  """None if every listed file is intact; else one phrase naming the first bad file and what is wrong.
  `checksums=None`: compare contents when the files total at most CHECKSUM_LIMIT_BYTES."""
  if checksums is None:
    checksums = sum(size for size, _ in files.values()) <= CHECKSUM_LIMIT_BYTES
  for rel, (size, _) in files.items():
    p = root / rel
    if not p.is_file():
      return f"{p} is missing"
    actual = p.stat().st_size
    if actual != size:
      return f"{p} has {actual} bytes, {size} were written"
  if checksums:
    for rel, (_, crc) in files.items():
      if crc32(root / rel) != crc:
        return f"{root / rel} does not match the checksum written with it"
  return None
