"""Latent caching as a multi-process JAX job: process p of P encodes its disjoint contiguous part of the image
dataset on its local devices into its own ArrayRecord shards, then one metadata step merges the parts.

  DST/parts/part-00001-of-00004/<latent builder>/1.0.0/…   one TFDS dataset per part (+ counts.json when done)
  DST/<latent builder>/1.0.0/…                             the merged dataset: the parts' shards, renumbered
                                                           (hard links), one dataset_info.json

Part p holds records [p·N/P, (p+1)·N/P) of the source in their encoding order, so the merged dataset equals a
single-process encode up to record order (bucket grouping is per part). A part is written atomically (TFDS
renames its finished directory), so a killed process leaves no half part: rerun just that part
(`data encode --parts P --part p`, byte-identical output) and merge again (`data encode --merge P`).

With `jax.distributed` (`data encode --distributed`, one process per host — `launch/` starts them on a pod; tests
use localhost) the part is `jax.process_index()` of `jax.process_count()`, and process 0 waits for every part's
`counts.json` on the shared filesystem and merges.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax

from nextstep_jax.data.builders import DatasetError, SPLIT, TfdsSource, VERSION
from nextstep_jax.data.latent_cache import encode_dataset, vae_encoder

COUNTS_FILE = "counts.json"


def part_dir(dst: str | os.PathLike, part: int, num_parts: int) -> Path:
  return Path(dst) / "parts" / f"part-{part:05d}-of-{num_parts:05d}"


def part_indices(num_records: int, part: int, num_parts: int) -> range:
  """The contiguous record range of `part` (sizes differ by at most one)."""
  if not 0 <= part < num_parts:
    raise DatasetError(f"--part {part} is not in [0, {num_parts}); parts are numbered from 0")
  return range(num_records * part // num_parts, num_records * (part + 1) // num_parts)


def encode_part(src: str | os.PathLike, dst: str | os.PathLike, encode, down_factor: int, part: int,
                num_parts: int, **kwargs: Any) -> tuple[str, dict]:
  """Encodes part `part` of `num_parts` of `src` into its part directory (replacing an earlier try of it)."""
  source = TfdsSource(src)
  out_dir = part_dir(dst, part, num_parts)
  if (out_dir / COUNTS_FILE).exists():
    (out_dir / COUNTS_FILE).unlink()  # not done until this try finishes
  out, counts = encode_dataset(src, out_dir, encode, down_factor, overwrite=True,
                               indices=part_indices(len(source), part, num_parts), **kwargs)
  tmp = out_dir / (COUNTS_FILE + ".tmp")
  tmp.write_text(json.dumps(counts, sort_keys=True))
  os.replace(tmp, out_dir / COUNTS_FILE)
  return out, counts


def _part_dataset(dst: str | os.PathLike, part: int, num_parts: int) -> Path:
  d = part_dir(dst, part, num_parts)
  found = sorted(d.glob(f"*/{VERSION}/dataset_info.json")) if (d / COUNTS_FILE).exists() else []
  if len(found) != 1:
    raise DatasetError(f"part {part} of {num_parts} is not finished in {d}; rerun it with "
                       f"`nextstep-jax data encode ... --parts {num_parts} --part {part}`")
  return found[0].parent


def wait_for_parts(dst: str | os.PathLike, num_parts: int, timeout_s: float, poll_s: float = 1.0) -> None:
  deadline = time.monotonic() + timeout_s
  while True:
    missing = [p for p in range(num_parts) if not (part_dir(dst, p, num_parts) / COUNTS_FILE).exists()]
    if not missing:
      return
    if time.monotonic() > deadline:
      raise DatasetError(f"parts {missing} of {num_parts} in {dst} did not finish within {timeout_s:.0f} s; rerun "
                         f"each with --parts {num_parts} --part N, then --merge {num_parts}")
    time.sleep(poll_s)


def merge_parts(dst: str | os.PathLike, num_parts: int) -> tuple[str, dict]:
  """The metadata step: one dataset under `dst` whose shards are the parts' shards (hard-linked, renumbered)."""
  parts = [_part_dataset(dst, p, num_parts) for p in range(num_parts)]
  infos = [json.loads((p / "dataset_info.json").read_text()) for p in parts]
  names = {i["name"] for i in infos}
  if len(names) != 1:
    raise DatasetError(f"parts in {dst} hold different datasets {sorted(names)}; re-encode them from one source")
  name = names.pop()
  shards, lengths, num_bytes = [], [], 0
  for p, info in zip(parts, infos):
    split, = [s for s in info["splits"] if s["name"] == SPLIT]
    files = sorted(p.glob(f"{name}-{SPLIT}.array_record-*"))
    if len(files) != len(split["shardLengths"]):
      raise DatasetError(f"{p}: {len(files)} shard files but {len(split['shardLengths'])} in dataset_info.json")
    shards += files
    lengths += [int(n) for n in split["shardLengths"]]
    num_bytes += int(split.get("numBytes", 0))
  final = Path(dst) / name / VERSION
  tmp = final.parent / f".{VERSION}.merging"
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)
  total = len(shards)
  for i, f in enumerate(shards):
    target = tmp / f"{name}-{SPLIT}.array_record-{i:05d}-of-{total:05d}"
    try:
      os.link(f, target)
    except OSError:
      shutil.copyfile(f, target)
  shutil.copyfile(parts[0] / "features.json", tmp / "features.json")
  info = dict(infos[0])
  info["splits"] = [dict(name=SPLIT, filepathTemplate="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                         numBytes=str(num_bytes), shardLengths=[str(n) for n in lengths])]
  (tmp / "dataset_info.json").write_text(json.dumps(info, indent=2, sort_keys=True))
  if final.exists():
    shutil.rmtree(final)
  os.replace(tmp, final)
  counts: dict[str, int] = {}
  for p in range(num_parts):
    for k, v in json.loads((part_dir(dst, p, num_parts) / COUNTS_FILE).read_text()).items():
      counts[k] = counts.get(k, 0) + int(v)
  return str(final), counts


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None
                           ) -> tuple[int, int]:
  """`jax.distributed.initialize` (explicit localhost/pod address, or auto-detected on TPU pods) → (index, count)."""
  kwargs = {}
  if coordinator:
    if num_processes is None or process_id is None:
      raise DatasetError("--coordinator needs --num-processes and --process-id")
    kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    if coordinator:
      raise DatasetError(f"--distributed: could not join the coordinator {coordinator} as process {process_id} of "
                         f"{num_processes} ({e})") from None
    raise DatasetError(f"--distributed found no coordinator to join ({e}); off a TPU pod pass --coordinator "
                       f"HOST:PORT --num-processes N --process-id I") from None
  return jax.process_index(), jax.process_count()


def encode_distributed(src, dst, vae_dir, coordinator: str | None = None, num_processes: int | None = None,
                       process_id: int | None = None, merge_timeout_s: float = 3600.0, **kwargs) -> tuple[str, dict]:
  """This process's part (on its local devices); process 0 then waits for all parts and merges them."""
  index, count = initialize_distributed(coordinator, num_processes, process_id)
  out, counts = encode_part(src, dst, *vae_encoder(vae_dir), index, count, **kwargs)
  if index != 0:
    return out, counts
  wait_for_parts(dst, count, merge_timeout_s)
  return merge_parts(dst, count)
