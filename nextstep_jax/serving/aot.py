"""AOT for serving: compile the engine's step (every slot advances one image token) for a TPU pod, and how many
slots fit in HBM.

`nextstep_jax.aot`'s "serve" program is the real `programs.step` over abstract sharded weights and slot state
(KV caches of every slot, rows over the data axes, KV heads over `tensor`). `slots_that_fit` compiles it at two slot counts, fits per-chip peak = fixed + slots · per_slot (weights, head and code are fixed; KV caches
and activations grow with the slots) and returns the largest slot count (a multiple of the data × fsdp size)
under the usable HBM.
"""
from __future__ import annotations

import dataclasses

from nextstep_jax import aot
from nextstep_jax.sharding import MESH_AXES, _resolve_sizes
from nextstep_jax.tpu_topology import pod_type


@dataclasses.dataclass(frozen=True)
class SlotsFit:
  pod: str
  resolution: int
  hbm_gib: float
  fixed_gib: float  # weights, head, code: the per-chip peak at zero slots (extrapolated)
  per_slot_gib: float  # KV cache + activations of one slot per chip
  slots: int  # the most slots that fit (a multiple of the data × fsdp size)
  probes: tuple[tuple[int, float], ...]  # (slots, compiled per-chip peak GiB)

  def line(self) -> str:
    probes = ", ".join(f"{s} slots → {g:.2f} GiB" for s, g in self.probes)
    return (f"{self.pod:8s} {self.resolution:4d}²  {self.slots:5d} slots fit in {self.hbm_gib:.2f} GiB/chip "
            f"(fixed {self.fixed_gib:.2f} GiB + {self.per_slot_gib * 1024:.1f} MiB/slot; compiled: {probes})")


GROWTH_TRIES = 4  # the second probe grows ×4 at most this many times until the slots' memory shows
MIN_GROWTH = 0.05  # ... i.e. until the peak grew by this share of the first probe's peak


def _peak_gib(config, pod: str, sample, slots: int) -> float:
  """Compiled per-chip peak GiB of the step at `slots`; a peak over the HBM still measures the slope, so it is
  returned rather than raised."""
  try:
    r = aot.compile_for_pod(config, pod, program="serve", sample=dataclasses.replace(sample, images=slots))
  except aot.DoesNotFit as e:
    if e.needed_bytes is None:
      raise
    return e.needed_bytes / aot.GIB
  return r.peak_bytes / aot.GIB


def _largest_that_fits(config, pod: str, sample, data: int, probes: list, hbm: float, guess: int) -> int:
  """The largest compiled slot count ≤ `guess` (a multiple of `data`) whose peak is under the HBM: the guess is
  compiled, and if it does not fit, the counts between the largest fitting probe and it are bisected (the linear
  model misses the compiler changing its layout at some slot count). Every compile is appended to `probes`."""
  lo, bad, count = max(s for s, g in probes if g <= hbm), None, guess
  while True:
    peak = _peak_gib(config, pod, sample, count)
    probes.append((count, peak))
    if peak <= hbm:
      lo = count
    else:
      bad = count
    if bad is None:
      return lo
    count = (lo + bad) // 2 // data * data
    if count <= lo:
      return lo


def slots_that_fit(config, pod: str, sample, probe_slots: tuple[int, int] | None = None,
                   verify: bool = False) -> SlotsFit:
  """Compiles the step at two slot counts on `pod`, extrapolates the per-chip peak linearly and (`verify`)
  compiles the extrapolated slot count, bisecting down to the largest count that fits when it does not. At a few slots
  the KV caches can hide in the allocator's slack (the peak may even shrink), so the second count grows ×4 until
  the peak has grown by MIN_GROWTH; a step whose peak never grows is one clear error, not "0 slots"."""
  sizes = _resolve_sizes([int(config.mesh.get(a, 1)) for a in MESH_AXES], pod_type(pod).num_chips, "config.mesh")
  # slots are rows over data × fsdp (act_batch): a count they do not divide is padded or replicated, and the peak
  # jumps (v5e-8, 14B, 512²: 16 slots 11.6 GiB, 17 slots 25.4 GiB)
  data = sizes[0] * sizes[1]
  a, b = probe_slots or (data, 4 * data)
  # the first count must fit: compile_for_pod's DoesNotFit (with its suggestions) is the answer if it does not
  r = aot.compile_for_pod(config, pod, program="serve", sample=dataclasses.replace(sample, images=a))
  first, hbm = r.peak_bytes / aot.GIB, r.hbm_bytes / aot.GIB
  probes = [(a, first)]
  for _ in range(GROWTH_TRIES + 1):
    peak = _peak_gib(config, pod, sample, b)
    probes.append((b, peak))
    if peak - first >= MIN_GROWTH * first:
      break
    b *= 4
  else:
    raise aot.AotError(f"{pod}: the serving step's per-chip peak did not grow by {MIN_GROWTH:.0%} from {a} to "
                       f"{probes[-1][0]} slots ({', '.join(f'{s}: {g:.2f} GiB' for s, g in probes)}); the slot "
                       f"memory cannot be extrapolated — pass --sample-batch N to compile N slots directly")
  per_slot = (probes[-1][1] - first) / (probes[-1][0] - a)
  fixed = first - a * per_slot
  fit = max(0, int((hbm - fixed) / per_slot) // data * data)
  if verify and fit > 0 and fit not in dict(probes):
    fit = _largest_that_fits(config, pod, sample, data, probes, hbm, fit)
  res = sample.resolution or int(config.data.resolution)
  return SlotsFit(pod=r.pod, resolution=res, hbm_gib=hbm, fixed_gib=fixed, per_slot_gib=per_slot, slots=fit,
                  probes=tuple(probes))

