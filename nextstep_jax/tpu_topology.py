"""Compile-only TPU devices for a named pod (e.g. "v5p-256"), so XLA:TPU can compile on a CPU-only machine.

Product names (chips or TensorCores as Google sells them) map to topology strings and chip configs; v4/v5p
count TensorCores in the name (v5p-256 = 128 megacore chips), v5e/v6e count chips.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

from jax.experimental import topologies


@dataclasses.dataclass(frozen=True)
class PodType:
  name: str  # e.g. "v5p-256"
  topology: str  # e.g. "v5:4x4x8"
  chip_config: str  # "megacore" or "default"
  hbm_gib: float  # usable HBM per chip (device), GiB
  peak_bf16_tflops: float  # per chip (device)

  @property
  def num_chips(self) -> int:
    return math.prod(int(x) for x in self.topology.split(":")[1].split("x"))


_GENERATIONS = {
    # product prefix: (topology prefix, chip config, cores counted in name, usable HBM GiB, bf16 TFLOP/s per chip)
    # usable HBM = the budget XLA:TPU (libtpu 0.0.42) reports in its out-of-memory message ("exceeds available HBM")
    "v4": ("v4", "megacore", 2, 30.75, 275.0),
    "v5p": ("v5", "megacore", 2, 95.74, 459.0),
    "v5e": ("v5e", "default", 1, 15.75, 197.0),
    "v6e": ("v6e", "default", 1, 31.25, 918.0),
}
_ALIASES = {"v5litepod": "v5e"}  # the Cloud TPU accelerator-type name of v5e
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def pod_type(name: str) -> PodType:
  """'v5p-256' → PodType(topology 'v5:4x4x8', megacore, …). Raises ValueError listing valid names."""
  try:
    gen, size = name.lower().split("-")
    gen = _ALIASES.get(gen, gen)
    topo_prefix, chip_config, cores, hbm, tflops = _GENERATIONS[gen]
    if int(size) % cores:
      raise ValueError(size)
    shape = (_SHAPES_2D if gen in ("v5e", "v6e") else _SHAPES_3D)[int(size) // cores]
  except (ValueError, KeyError):
    examples = ", ".join(f"{g}-{c}" for g, c in (("v4", 64), ("v5p", 128), ("v5p", 256), ("v5e", 256), ("v6e", 256)))
    raise ValueError(f"unknown TPU pod type {name!r}; use <generation>-<size> such as {examples}") from None
  return PodType(f"{gen}-{size}", f"{topo_prefix}:{shape}", chip_config, hbm, tflops)


@functools.lru_cache(maxsize=None)
def topology_devices(name: str, num_slices: int = 1) -> tuple[PodType, tuple]:
  """Compile-only devices for `num_slices` slices of pod `name` (needs the `tpu` extra: libtpu). Cached: jax's
  trace cache treats two topologies' devices with the same ids as equal, so a second program compiled in one process
  on fresh devices would reuse shardings bound to the first ones ("incompatible devices")."""
  # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) when it loads; compile-only devices need no exclusive
  # TPU access, so let several compiling processes (other users, pytest-xdist workers) load it at once
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  pod = pod_type(name)
  dims = [int(d) for d in pod.topology.split(":")[1].split("x")] + [1]
  host = tuple(min(b, d) for b, d in zip((2, 2, 1), dims))  # a host holds 2×2 chips; a 1-chip pod, one
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=pod.topology, chip_config_name=pod.chip_config,
                                        chips_per_host_bounds=host, num_slices=num_slices)
  except Exception as e:  # libtpu missing or the topology unknown to this libtpu
    raise RuntimeError(f"cannot build TPU topology {pod.topology} for {name}: {e}. Install the TPU compiler with "
                       f"pip install -e '.[tpu]'") from None
  return pod, tuple(topo.devices)
