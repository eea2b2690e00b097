"""AOT for serving: compile the engine's step (every slot advances one image token) for a TPU pod, and how many
slots fit in HBM.

`lower_step` is `nextstep_jax.aot`'s "serve" program: the real `programs.step` over abstract sharded weights and
slot state (KV caches of every slot, rows over the data axes, KV heads over `tensor`). `slots_that_fit` compiles
it at two slot counts, fits per-chip peak = fixed + slots · per_slot (weights, head and code are fixed; KV caches
and activations grow with the slots) and returns the largest slot count (a multiple of the data-parallel size)
under the usable HBM.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from nextstep_jax import sharding
from nextstep_jax.config import ModelConfig


def lower_step(config, cfg: ModelConfig, mesh, sample):
  """(lowered step, shape dict, analytic FLOPs per step, notes) — the `aot` program table's contract."""
  from nextstep_jax import aot
  from nextstep_jax.models.nextstep import NextStep, abstract_params
  from nextstep_jax.serving import programs as P
  from nextstep_jax.train import flops as flops_lib
  _, res, (gh, gw), flow_cfg = aot.sample_geometry(config, cfg, sample)
  n = gh * gw
  src = n if sample.edit else 0
  slots = sample.images or mesh.shape["data"]
  spec = P.SlotSpec(slots=slots, branches=3 if sample.edit else 2, grid_h=gh, grid_w=gw,
                    cache_len=sample.prompt_len + src + n, flow=flow_cfg, src_tokens=src, per_layer=False)
  abstract, names = abstract_params(cfg)
  params = aot._abstract(abstract, sharding.tree_shardings(names, abstract, mesh))
  state_sh = P.state_shardings(cfg, spec, mesh)
  state = aot._abstract(jax.eval_shape(functools.partial(P.init_state, cfg, spec)), state_sh)
  active = jax.ShapeDtypeStruct((slots,), jnp.bool_, sharding=NamedSharding(mesh, PartitionSpec()))
  step = jax.jit(functools.partial(P.step, NextStep(cfg), spec), donate_argnums=(1,), out_shardings=state_sh)
  try:
    lowered = step.lower(params, state, active)
  except Exception as e:
    raise aot.AotError(f"tracing the serving step failed: {aot.one_line(e)}") from None
  rows = spec.rows
  attn = 4.0 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * spec.cache_len
  head = 2.0 * cfg.hidden_size**2 + sample.steps * flops_lib.head_forward_flops_per_row(cfg)
  fl = flops_lib.StepFlops(backbone=rows * (flops_lib.backbone_forward_flops_per_token(cfg, 0) + attn),
                           head=rows * head)
  kv_bytes = 2 * cfg.num_layers * rows * cfg.num_kv_heads * spec.cache_len * cfg.resolved_head_dim * jnp.dtype(
      cfg.dtype).itemsize
  shape = dict(slots=slots, cfg_branches=spec.branches, rows=rows, resolution=res, image_tokens=n,
               cache_len=spec.cache_len, flow_steps=sample.steps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
               kv_cache_gib_total=round(kv_bytes / aot.GIB, 3))
  notes = ["one call = one image token for every slot; an image takes image_tokens calls"]
  return lowered, shape, fl, notes


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
  from nextstep_jax import aot
  from nextstep_jax.tpu_topology import pod_type
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

