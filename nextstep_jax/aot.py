"""Ahead-of-time compilation for a TPU pod on any machine: does this config fit that pod, and how fast could it be?

`compile_for_pod(config, "v5p-256")` builds compile-only TPU devices for the pod (`tpu_topology`), the mesh of
`config.mesh`, an abstract sharded train state and batch (ShapeDtypeStructs carrying NamedShardings: nothing is
allocated), lowers the *real* jitted train step (or, with `program="sample"`, the real generation program:
prefill + token loop + VAE decode) and compiles it with XLA:TPU. It returns an `AotResult`: the compiler's
per-chip peak memory against the usable HBM, compile time, analytic FLOPs (train/flops.py) and the step time
those FLOPs imply at 40/50/60% MFU. A program over the HBM budget raises `DoesNotFit` (exit code 3 in the CLI)
with what it needs, what the chip has and the config changes to try; every other failure is an `AotError`
(exit code 2).

Needs libtpu (`pip install -e '.[tpu]'`); run with JAX_PLATFORMS=cpu on a machine without TPUs.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from nextstep_jax import sharding
from nextstep_jax.config import ModelConfig, VAEConfig
from nextstep_jax.data.pipeline import batch_shapes, batch_shardings
from nextstep_jax.models import quant
from nextstep_jax.models.flux_vae import FluxVAE, image_multiple
from nextstep_jax.models.latents import token_grid
from nextstep_jax.models.nextstep import NextStep, abstract_params
from nextstep_jax.sampling import flow
from nextstep_jax.sampling.generate import Spec, compiled_program
from nextstep_jax.serving import programs as slot_programs
from nextstep_jax.tpu_topology import PodType, pod_type, topology_devices
from nextstep_jax.train import flops as flops_lib
from nextstep_jax.train.config import TrainConfig
from nextstep_jax.train.objective import StepContext
from nextstep_jax.train.optimizer import make_optimizer
from nextstep_jax.train.registry import get_objective
from nextstep_jax.train.state import state_shardings

PROGRAMS = ("train", "sample", "serve")
MFU_LEVELS = (0.4, 0.5, 0.6)
EXIT_ERROR = 2
EXIT_DOES_NOT_FIT = 3
GIB = 2.0**30


class AotError(Exception):
  """AOT compilation failed for a reason other than memory; `str(e)` is one line."""
  exit_code = EXIT_ERROR


class DoesNotFit(AotError):
  """The program needs more HBM per chip than the pod has."""
  exit_code = EXIT_DOES_NOT_FIT

  def __init__(self, message: str, needed_bytes: float | None, available_bytes: float):
    super().__init__(message)
    self.needed_bytes, self.available_bytes = needed_bytes, available_bytes


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """The generation program to compile (defaults: the official text-to-image sampler)."""
  images: int = 0  # images per call; 0 = one per data-parallel group (mesh "data" size)
  steps: int = 50  # flow-sampler steps per token
  prompt_len: int = 256  # prompt bucket
  resolution: int = 0  # square image side in pixels; 0 = config.data.resolution
  edit: bool = False  # editing program: 3 CFG branches + a source image of the same size in the prompt
  quantize: str = ""  # "int8": the backbone's dense kernels stored int8 (models/quant.py), as `sample --quantize`


@dataclasses.dataclass
class AotResult:
  program: str
  pod: str
  topology: str
  num_slices: int
  num_devices: int
  mesh: dict[str, int]
  shape: dict[str, Any]  # what was compiled: batch, sequence, micro-batches, remat, … (program-specific)
  peak_bytes: float
  peak_source: str  # "peak_memory_in_bytes" or "arguments+outputs+temps-aliased"
  hbm_bytes: float
  memory: dict[str, float]  # the compiler's memory_analysis fields (bytes per chip)
  lower_s: float
  compile_s: float
  flops_backbone: float  # analytic, per train step / per generation call
  flops_head: float
  peak_flops_per_chip: float
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.hbm_bytes

  @property
  def flops_total(self) -> float:
    return self.flops_backbone + self.flops_head

  def step_time_s(self, mfu: float) -> float:
    return self.flops_total / (mfu * self.peak_flops_per_chip * self.num_devices)

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out.update(ok=True, fits=self.fits, flops_total=self.flops_total, peak_gib=self.peak_bytes / GIB,
               hbm_gib=self.hbm_bytes / GIB, step_time_s={f"{m:.0%}": self.step_time_s(m) for m in MFU_LEVELS})
    return out

  def summary(self) -> str:
    """Human-readable report (several lines)."""
    m = self.memory
    what = "step" if self.program == "train" else "call"
    verdict = "fits" if self.fits else "DOES NOT FIT"
    slices = f", {self.num_slices} slices" if self.num_slices > 1 else ""
    lines = [
        f"{self.program} program on {self.pod} ({self.topology}, {self.num_devices} chips{slices})",
        f"  mesh           {' '.join(f'{k}={v}' for k, v in self.mesh.items())}",
        f"  compiled       {', '.join(f'{k}={v}' for k, v in self.shape.items())}",
        f"  memory/chip    {self.peak_bytes / GIB:.2f} GiB ({self.peak_source}) of {self.hbm_bytes / GIB:.2f} GiB "
        f"usable HBM: {verdict} ({self.peak_bytes / self.hbm_bytes:.0%})",
        f"                 arguments {m['argument'] / GIB:.2f} GiB, outputs {m['output'] / GIB:.2f}, aliased "
        f"{m['alias'] / GIB:.2f}, temporaries {m['temp'] / GIB:.2f}, code {m['generated_code'] / GIB:.3f}",
        f"  compile time   {self.compile_s:.1f} s (+ {self.lower_s:.1f} s tracing/lowering)",
        f"  FLOPs/{what}     backbone {self.flops_backbone:.3e}, flow head {self.flops_head:.3e}, total "
        f"{self.flops_total:.3e} (analytic)",
        f"  {what} time      " + ", ".join(f"{self.step_time_s(u):.3g} s at {u:.0%} MFU" for u in MFU_LEVELS)
        + f" ({self.peak_flops_per_chip / 1e12:.0f} TFLOP/s bf16 per chip)",
    ]
    lines += [f"  note           {n}" for n in self.notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- entry point


def compile_for_pod(config, pod: str, num_slices: int = 1, program: str = "train",
                    sample: SampleSettings = SampleSettings()) -> AotResult:
  """Lowers and compiles `program` of `config` for `num_slices` slices of `pod`; raises DoesNotFit / AotError."""
  if program not in PROGRAMS:
    raise AotError(f"unknown program {program!r}; use one of {', '.join(PROGRAMS)}")
  try:
    ptype, devices = topology_devices(pod, num_slices)
  except (ValueError, RuntimeError) as e:
    raise AotError(str(e)) from None
  cfg = ModelConfig.from_dict(config.model)
  mesh = build_mesh(config, devices, num_slices)
  lower = {"train": _lower_train, "sample": _lower_sample, "serve": _lower_serve}[program]
  t0 = time.perf_counter()
  with sharding.use_mesh(mesh):
    lowered, shape, fl, notes = lower(config, cfg, mesh, sample)
  lower_s = time.perf_counter() - t0
  hbm = ptype.hbm_gib * GIB
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA raises JaxRuntimeError / XlaRuntimeError with a status prefix
    raise _compile_error(e, config, mesh, ptype, program, hbm) from None
  compile_s = time.perf_counter() - t0
  memory, peak, source = memory_stats(compiled)
  result = AotResult(program=program, pod=ptype.name, topology=ptype.topology, num_slices=num_slices,
                     num_devices=len(devices), mesh=dict(mesh.shape), shape=shape, peak_bytes=peak,
                     peak_source=source, hbm_bytes=hbm, memory=memory, lower_s=lower_s, compile_s=compile_s,
                     flops_backbone=fl.backbone, flops_head=fl.head,
                     peak_flops_per_chip=ptype.peak_bf16_tflops * 1e12, notes=notes)
  if not result.fits:  # the compiler accepted it but its own peak says otherwise: same verdict as an OOM
    raise DoesNotFit(_does_not_fit_message(peak, hbm, config, mesh, ptype, program), peak, hbm)
  return result


def build_mesh(config, devices: list, num_slices: int):
  """The (data, fsdp, tensor) mesh of `config.mesh` over `devices`; dcn sizes must multiply to `num_slices`."""
  m = config.mesh
  dcn = math.prod(int(m.get(f"dcn_{a}", 1)) for a in sharding.MESH_AXES)
  if num_slices > 1 and dcn != num_slices and -1 not in [int(m.get(f"dcn_{a}", 1)) for a in sharding.MESH_AXES]:
    raise AotError(f"config.mesh dcn sizes multiply to {dcn} but --num-slices is {num_slices}; spread the slices "
                   f"over an axis, e.g. --config.mesh.dcn_data={num_slices} (data parallel across slices) or "
                   f"--config.mesh.dcn_fsdp={num_slices}")
  if num_slices == 1 and dcn > 1:
    raise AotError(f"config.mesh dcn sizes multiply to {dcn} but the pod is one slice; pass --num-slices {dcn} "
                   f"or set the dcn_* sizes to 1")
  try:
    return sharding.make_mesh(m, devices)
  except ValueError as e:
    raise AotError(f"{e} (the pod has {len(devices)} chips)") from None


# ----------------------------------------------------------------------------------------------- programs


def _batch_rows_per_shard(rows: int, mesh) -> int:
  """How many batch shards `rows` rows actually get (1 = replicated) under the act_batch rule."""
  spec = sharding.logical_to_spec(("act_batch",), (rows,), mesh)
  axes = spec[0] if len(spec) else None
  axes = (axes,) if isinstance(axes, str) else (axes or ())
  return math.prod(mesh.shape[a] for a in axes)


def _lower_train(config, cfg: ModelConfig, mesh, sample: SampleSettings):
  run = TrainConfig.from_config(config.train)
  objective = get_objective(run.objective)
  section = objective.config_view(config)
  tx, schedule = make_optimizer(run)
  abstract_state, state_sh = state_shardings(cfg, tx, mesh, objective.trainable_init(cfg, section))
  structs = batch_shapes(config.data, step_input=True)
  shapes = {k: v.shape for k, v in structs.items()}
  for k, shape in objective.batch_extras(shapes).items():
    structs[k], shapes[k] = jax.ShapeDtypeStruct(shape, jnp.float32), shape
  batch = sharding.abstract_sharded(structs, batch_shardings(shapes, mesh))
  key = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype, sharding=NamedSharding(mesh, P()))
  mb = run.microbatches
  b, length = shapes["input_ids"]
  if b % mb:
    raise AotError(f"config.data.global_batch_size={b} cannot be split into config.train.microbatches={mb}; "
                   f"use a divisor of {b}")
  notes = []
  shards = _batch_rows_per_shard(b // mb, mesh)
  batch_axes = mesh.shape["data"] * mesh.shape["fsdp"]
  if shards < batch_axes:
    notes.append(f"a micro-batch of {b // mb} rows cannot be split over the {batch_axes} data×fsdp shards: "
                 f"activations are replicated on {batch_axes // shards} devices; use fewer microbatches or a "
                 f"bigger global batch")
  slots = shapes["image_tokens"][1]
  ctx = StepContext(cfg=cfg, run=run, section=section, tx=tx, schedule=schedule, state_shardings=state_sh,
                    batch_shardings=jax.tree.map(lambda x: x.sharding, batch), mesh=mesh, init_rng=key)
  try:
    lowered = objective.abstract_step(ctx, abstract_state).lower(abstract_state, batch, key)
  except Exception as e:
    raise AotError(f"tracing the {run.objective} train step failed: {one_line(e)}") from None
  fl = objective.step_flops(cfg, b, length, b * slots, section)
  shape = dict(objective=run.objective, global_batch=b, seq_len=length, image_slots=slots, microbatches=mb,
               rows_per_chip_per_microbatch=round(b / mb / shards, 3), remat=cfg.remat_policy, dtype=cfg.dtype,
               param_dtype=cfg.param_dtype, attention=cfg.attention_impl)
  notes.append("head FLOPs count every image slot as filled (an upper bound for packed rows)")
  return lowered, shape, fl, notes


def sample_geometry(config, cfg: ModelConfig, sample: SampleSettings):
  """(VAE config, resolution, token grid (h, w), flow config) of the sampling/serving program to compile."""
  vae_cfg = VAEConfig.from_dict(config.vae)
  res = sample.resolution or int(config.data.resolution)
  try:
    grid = token_grid(res, res, vae_cfg.downsample_factor, cfg.latent_patch_size)
    flow_cfg = flow.FlowConfig("sde_a", sample.steps, 3.2 if sample.edit else 1.0).validate()
  except ValueError as e:
    raise AotError(f"sampler settings: {e}") from None
  return vae_cfg, res, grid, flow_cfg


def _lower_sample(config, cfg: ModelConfig, mesh, sample: SampleSettings):
  vae_cfg, res, (gh, gw), flow_cfg = sample_geometry(config, cfg, sample)
  n_tok = gh * gw
  src = n_tok if sample.edit else 0
  prompt = sample.prompt_len + src
  if prompt + n_tok > cfg.max_position_embeddings:
    raise AotError(f"prompt {prompt} + {n_tok} image tokens ({res}px) exceeds max_position_embeddings "
                   f"{cfg.max_position_embeddings}; pass a smaller --sample-resolution or --sample-prompt-len")
  images = sample.images or mesh.shape["data"]
  branches = 3 if sample.edit else 2
  spec = Spec(num_images=images, branches=branches, prompt_len=prompt, grid_h=gh, grid_w=gw, flow=flow_cfg,
              src_tokens=src, noise_repeat=1)
  rows = spec.rows
  abstract, names = abstract_params(cfg)
  if sample.quantize:
    abstract, names = quant.quantized_abstract(abstract, names)
  params = sharding.sharded_abstract_params(abstract, names, mesh)
  size = image_multiple(vae_cfg)
  vae_abs, vae_names = sharding.abstract_with_names(
      lambda r: FluxVAE(vae_cfg).init(r, jnp.zeros((1, size, size, vae_cfg.in_channels), jnp.float32)),
      jax.random.key(0))
  vae_params = sharding.sharded_abstract_params(vae_abs, vae_names, mesh)

  def rows_array(shape, dtype):
    spec_ = sharding.logical_to_spec(("act_batch",) + (None,) * (len(shape) - 1), shape, mesh)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec_))
  rep = NamedSharding(mesh, P())
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  key = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype, sharding=rep)
  src_rows = rows_array((rows, src, cfg.token_dim), jnp.float32) if src else None
  args = (params, vae_params, rows_array((rows, prompt), jnp.int32), rows_array((rows, prompt), jnp.int32),
          src_rows, scalar, scalar, key, None)
  try:
    lowered = compiled_program(cfg, vae_cfg, spec).lower(*args)
  except Exception as e:
    raise AotError(f"tracing the generation program failed: {one_line(e)}") from None
  fl = sample_flops(cfg, rows, prompt, n_tok, sample.steps)
  shape = dict(images=images, cfg_branches=branches, rows=rows, prompt_bucket=prompt, resolution=res,
               image_tokens=n_tok, flow_steps=sample.steps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
               weights=sample.quantize or cfg.param_dtype)
  notes = ["token-by-token decode is memory-bandwidth bound: MFU-based call times are optimistic; VAE decode "
           "FLOPs are not counted"]
  return lowered, shape, fl, notes


def _lower_serve(config, cfg: ModelConfig, mesh, sample):
  """The serving engine's step (serving/programs.py) for `sample.images` slots (0 = the data-parallel size)."""
  _, res, (gh, gw), flow_cfg = sample_geometry(config, cfg, sample)
  n = gh * gw
  src = n if sample.edit else 0
  slots = sample.images or mesh.shape["data"]
  spec = slot_programs.SlotSpec(slots=slots, branches=3 if sample.edit else 2, grid_h=gh, grid_w=gw,
                    cache_len=sample.prompt_len + src + n, flow=flow_cfg, src_tokens=src, per_layer=False)
  abstract, names = abstract_params(cfg)
  params = sharding.sharded_abstract_params(abstract, names, mesh)
  state_sh = slot_programs.state_shardings(cfg, spec, mesh)
  state = sharding.abstract_sharded(jax.eval_shape(functools.partial(slot_programs.init_state, cfg, spec)), state_sh)
  active = jax.ShapeDtypeStruct((slots,), jnp.bool_, sharding=NamedSharding(mesh, P()))
  step = jax.jit(functools.partial(slot_programs.step, NextStep(cfg), spec), donate_argnums=(1,), out_shardings=state_sh)
  try:
    lowered = step.lower(params, state, active)
  except Exception as e:
    raise AotError(f"tracing the serving step failed: {one_line(e)}") from None
  rows = spec.rows
  attn = 4.0 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * spec.cache_len
  head = 2.0 * cfg.hidden_size**2 + sample.steps * flops_lib.head_forward_flops_per_row(cfg)
  fl = flops_lib.StepFlops(backbone=rows * (flops_lib.backbone_forward_flops_per_token(cfg, 0) + attn),
                           head=rows * head)
  kv_bytes = 2 * cfg.num_layers * rows * cfg.num_kv_heads * spec.cache_len * cfg.resolved_head_dim * jnp.dtype(
      cfg.dtype).itemsize
  shape = dict(slots=slots, cfg_branches=spec.branches, rows=rows, resolution=res, image_tokens=n,
               cache_len=spec.cache_len, flow_steps=sample.steps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
               kv_cache_gib_total=round(kv_bytes / GIB, 3))
  notes = ["one call = one image token for every slot; an image takes image_tokens calls"]
  return lowered, shape, fl, notes


def sample_flops(cfg: ModelConfig, rows: int, prompt_len: int, n_tokens: int, steps: int) -> flops_lib.StepFlops:
  """Forward FLOPs of one generation call: prefill + one cached LM step per token + `steps` head calls per token."""
  s_len = prompt_len + n_tokens
  matmul = flops_lib.backbone_forward_flops_per_token(cfg, 0)
  attn_decode = 4.0 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * s_len  # the whole static cache
  backbone = rows * (prompt_len * flops_lib.backbone_forward_flops_per_token(cfg, prompt_len)
                     + (n_tokens - 1) * (matmul + attn_decode))
  out_proj = 2.0 * cfg.hidden_size * cfg.hidden_size
  head = rows * n_tokens * (out_proj + steps * flops_lib.head_forward_flops_per_row(cfg))
  return flops_lib.StepFlops(backbone=backbone, head=head)


# ----------------------------------------------------------------------------------------------- memory & errors


def memory_stats(compiled) -> tuple[dict[str, float], float, str]:
  """(memory_analysis fields in bytes, per-chip peak, which quantity the peak is)."""
  ma = compiled.memory_analysis()
  fields = ("argument", "output", "alias", "temp", "generated_code")
  mem = {f: float(getattr(ma, f"{f}_size_in_bytes", 0) or 0) for f in fields}
  peak = float(getattr(ma, "peak_memory_in_bytes", 0) or 0)
  if peak > 0:
    return mem, peak, "peak_memory_in_bytes"
  return mem, mem["argument"] + mem["output"] - mem["alias"] + mem["temp"], "arguments+outputs+temps-aliased"


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_NEEDED_PATTERNS = (
    re.compile(r"\(([\d.]+)([KMGT]?)\)\s*exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
    re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"),
)


def parse_oom(message: str) -> tuple[float, float] | None:
  """(needed, available) bytes from an XLA:TPU out-of-HBM message, or None if it is not one."""
  for pat in _NEEDED_PATTERNS:
    m = pat.search(message)
    if m:
      return float(m.group(1)) * _UNITS[m.group(2)], float(m.group(3)) * _UNITS[m.group(4)]
  return None


def one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:400]}{'…' if len(text) > 400 else ''}"


def _compile_error(e: Exception, config, mesh, ptype: PodType, program: str, hbm: float) -> AotError:
  msg = str(e)
  parsed = parse_oom(msg)
  if parsed is None and "RESOURCE_EXHAUSTED" not in msg and "exceeds available HBM" not in msg:
    return AotError(f"XLA:TPU compilation failed: {one_line(e)}")
  needed, available = parsed if parsed else (None, hbm)
  return DoesNotFit(_does_not_fit_message(needed, available, config, mesh, ptype, program), needed, available)


def _does_not_fit_message(needed: float | None, available: float, config, mesh, ptype: PodType,
                          program: str) -> str:
  need = f"{needed / GIB:.1f}" if needed else "more than"
  return (f"does not fit: needs {need} of {available / GIB:.1f} GiB per chip on {ptype.name}; try "
          + "; ".join(suggestions(config, mesh, ptype, program)))


def bigger_pod(ptype: PodType) -> str | None:
  """The next pod size of the same generation that this libtpu's topology table knows, if any."""
  gen, size = ptype.name.split("-")
  for mult in (2, 4, 8):
    try:
      return pod_type(f"{gen}-{int(size) * mult}").name
    except ValueError:
      continue
  return None


def suggestions(config, mesh, ptype: PodType, program: str) -> list[str]:
  """Concrete config changes that reduce per-chip memory, most effective first."""
  out = []
  m = config.mesh
  if mesh.shape["data"] > 1:
    out.append(f"shard the weights over more chips (--config.mesh.fsdp=-1 --config.mesh.data=1; data is "
               f"{mesh.shape['data']})")
  if program == "train":
    remat = config.model.remat_policy
    if remat != "full":
      out.append(f"--config.model.remat_policy=full (is {remat!r})")
    b, mb = int(config.data.global_batch_size), int(config.train.microbatches)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if b // (2 * mb) >= shards and b % (2 * mb) == 0:
      out.append(f"--config.train.microbatches={2 * mb} ({b // mb // shards} rows per chip per micro-batch now)")
    elif b // mb > 1:
      out.append(f"a smaller per-chip batch (--config.data.global_batch_size={b // 2})")
    if int(m.tensor) == 1 and mesh.shape["fsdp"] % 4 == 0:
      out.append("tensor parallelism for the activations and logits (--config.mesh.tensor=4 --config.mesh.fsdp=-1)")
  else:
    out.append("fewer images per call (--sample-batch)")
  big = bigger_pod(ptype)
  out.append(f"a bigger pod ({big})" if big else "a bigger pod")
  return out
