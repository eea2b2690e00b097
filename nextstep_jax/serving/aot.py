"""AOT for serving: compile the engine's step (every slot advances one image token) for a TPU pod, and how many
slots fit in HBM.

`nextstep_jax.aot`'s "serve" program is the real `programs.step` over abstract sharded weights and slot state
(KV caches of every slot, rows over the data axes, KV heads over `tensor`). `slots_that_fit` compiles it at two slot counts, fits per-chip peak = fixed + slots · per_slot (weights, head and code are fixed; KV caches
and activations grow with the slots) and returns the largest slot count (a multiple of the data-parallel size)
under the usable HBM.
"""
from __future__ import annotations

import dataclasses

from nextstep_jax import aot
from nextstep_jax.tpu_topology import pod_type


@dataclasses.dataclass(frozen=True)
class SlotsFit:
  pod: str
  resolution: int
  hbm_gib: float
  fixed_gib: float  # weights, head, code: the per-chip peak at zero slots (extrapolated)
  per_slot_gib: float  # KV cache + activations of one slot per chip
  slots: int  # the most slots that fit (a multiple of the data-parallel size)
  probes: tuple[tuple[int, float], ...]  # (slots, compiled per-chip peak GiB)

  def line(self) -> str:
    probes = ", ".join(f"{s} slots → {g:.2f} GiB" for s, g in self.probes)
    return (f"{self.pod:8s} {self.resolution:4d}²  {self.slots:5d} slots fit in {self.hbm_gib:.2f} GiB/chip "
            f"(fixed {self.fixed_gib:.2f} GiB + {self.per_slot_gib * 1024:.1f} MiB/slot; compiled: {probes})")


def slots_that_fit(config, pod: str, sample, probe_slots: tuple[int, int] | None = None,
                   verify: bool = False) -> SlotsFit:
  """Compiles the step at two slot counts on `pod`, extrapolates the per-chip peak linearly and (`verify`)
  compiles the extrapolated slot count (compile_for_pod raises DoesNotFit if it does not fit)."""
  data = int(config.mesh.get("data", 1))
  data = data if data > 0 else pod_type(pod).num_chips
  a, b = probe_slots or (data, 4 * data)
  probes = []
  for s in (a, b):
    r = aot.compile_for_pod(config, pod, program="serve", sample=dataclasses.replace(sample, images=s))
    probes.append((s, r.peak_bytes / aot.GIB))
  hbm = r.hbm_bytes / aot.GIB
  per_slot = (probes[1][1] - probes[0][1]) / (b - a)
  fixed = probes[0][1] - a * per_slot
  fit = int((hbm - fixed) / per_slot) if per_slot > 0 else 0
  fit = max(0, fit // data * data)
  if verify and fit > b:  # the extrapolated count, compiled: its peak must be under the HBM
    r = aot.compile_for_pod(config, pod, program="serve", sample=dataclasses.replace(sample, images=fit))
    probes.append((fit, r.peak_bytes / aot.GIB))
  res = sample.resolution or int(config.data.resolution)
  return SlotsFit(pod=r.pod, resolution=res, hbm_gib=hbm, fixed_gib=fixed, per_slot_gib=per_slot, slots=fit,
                  probes=tuple(probes))

