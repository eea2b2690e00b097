"""`train(config, workdir)`: one curriculum stage, start to finish, resumable at any point.

Start-up order: own checkpoint in WORKDIR (exact resume: state + data position) → `config.train.init_from`
(previous stage's params, fresh optimizer; parameters it lacks, e.g. the head when starting from a plain Qwen
checkpoint, keep their fresh initialisation) → fresh init. SIGTERM (preemption) saves a checkpoint at the next
step boundary and returns normally (exit code 0). Logging and exports happen on process 0.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from nextstep_jax import params_io, sharding
from nextstep_jax.checkpoint import Checkpointer
from nextstep_jax.config import ModelConfig, VAEConfig
from nextstep_jax.data.buckets import bucket_grids
from nextstep_jax.data.pipeline import batch_shardings, to_global
from nextstep_jax.images import make_grid, save_png
from nextstep_jax.models.flux_vae import encode_latents
from nextstep_jax.models.image_grid import check_grids_fit
from nextstep_jax.models.latents import patchify
from nextstep_jax.sampling.pipeline import Options, Sampler
from nextstep_jax.tokens import NextStepTokenizer
from nextstep_jax.train import flops as flops_lib
from nextstep_jax.train.config import TrainConfig
from nextstep_jax.train.metrics import MetricWriter
from nextstep_jax.train.objective import StepContext
from nextstep_jax.train.optimizer import make_optimizer, model_params
from nextstep_jax.train.registry import get_objective
from nextstep_jax.train.state import init_state, state_shardings
from nextstep_jax.train.stops import NonFiniteGuard, Preemption


@dataclasses.dataclass
class TrainResult:
  step: int
  preempted: bool
  last_metrics: dict[str, float]


def export_model(workdir: str, state_params: Any, config, run: TrainConfig, step: int) -> Path:
  """Params-only model dir at WORKDIR/export (atomic rename), with the VAE and tokenizer of `vae_from`.
  Called by every process of a multi-host job (a collective params save); process 0 writes the rest."""
  out = Path(workdir) / "export"
  tmp = Path(workdir) / "export.tmp"
  if jax.process_index() == 0:
    shutil.rmtree(tmp, ignore_errors=True)
  multihost_utils.sync_global_devices("export_model:clean")
  params_io.save_params(tmp / "params", state_params)
  if jax.process_index() != 0:
    return out
  sections = {"model": ModelConfig.from_dict(config.model), "train": {"step": step}}
  src = run.vae_from
  if src and Path(src, "vae_params").exists():
    sections["vae"] = params_io.read_model_config(src)["vae"]
    shutil.copytree(Path(src, "vae_params"), tmp / "vae_params")
    if Path(src, "tokenizer").exists():
      shutil.copytree(Path(src, "tokenizer"), tmp / "tokenizer")
  elif config.data.get("tokenizer") and Path(config.data.tokenizer).is_dir():
    shutil.copytree(config.data.tokenizer, tmp / "tokenizer")
  params_io.write_model_config(tmp, sections)
  shutil.rmtree(out, ignore_errors=True)
  tmp.rename(out)
  return out


def train(config, workdir: str, max_steps: int | None = None) -> TrainResult:
  """Runs (or resumes) the stage described by `config` in `workdir`. `max_steps` stops early (tests)."""
  cfg = ModelConfig.from_dict(config.model)
  run = TrainConfig.from_config(config.train).check_batch(int(config.data.global_batch_size))
  objective = get_objective(run.objective)
  section = objective.config_view(config)
  if not run.synthetic_data:
    d = config.data
    check_grids_fit(cfg, bucket_grids(d.resolution, d.down_factor, d.buckets),
                    "lower config.data.resolution or raise model.base_image_grid_size")
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = make_optimizer(run)
  trainable = objective.trainable_init(cfg, section)
  abstract, shardings = state_shardings(cfg, tx, mesh, trainable)
  data_iter = objective.data_iterator(config, cfg, run, jax.process_index(), jax.process_count())
  ckpt = Checkpointer(workdir, run.save_every, run.keep, run.async_checkpoint, model_config=cfg)
  is_main = jax.process_index() == 0
  key = jax.random.key(run.seed)
  init_rng = jax.random.fold_in(key, 1)

  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(start, abstract, data_iter)
    print(f"resumed from {ckpt.directory}/{start}", flush=True)
  else:
    given = objective.initial_params(run, cfg, mesh)
    state = init_state(cfg, tx, mesh, init_rng, params=given, init=trainable)
    start = 0
    if given is not None:
      print(f"initialised from {run.init_from} (fresh optimizer)", flush=True)
  writer = MetricWriter(workdir, enabled=is_main, resume_step=start)

  first = next(data_iter)
  global_shapes = {k: (v.shape[0] * jax.process_count(),) + v.shape[1:] for k, v in first.items()}
  b_sh = batch_shardings(global_shapes, mesh)
  encoder = _PixelEncoder(config, run, mesh) if "pixel_values" in first else None
  if encoder is not None:
    b_sh = {k: v for k, v in b_sh.items() if k != "pixel_values"}
    b_sh["image_tokens"] = encoder.sharding(global_shapes["pixel_values"][0])
  ctx = StepContext(cfg=cfg, run=run, section=section, tx=tx, schedule=schedule, state_shardings=shardings,
                    batch_shardings=b_sh, mesh=mesh, init_rng=init_rng, workdir=workdir)
  step_fn = objective.make_step(ctx, state.params if start == 0 else None)
  peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind, run.peak_flops_per_device)
  total_steps = run.steps if max_steps is None else min(run.steps, max_steps)
  step, metrics, preempted, last_saved = start, {}, False, start
  pending, guard = first, NonFiniteGuard(run.max_nonfinite_steps)
  with Preemption() as preemption, sharding.use_mesh(mesh):
    t_last = time.perf_counter()
    while step < total_steps:
      local = pending if pending is not None else next(data_iter)
      pending = None
      batch = to_global(local, mesh)
      if encoder is not None:
        batch = encoder(batch)
      state, m = step_fn(state, batch, key)
      step += 1
      guard.push(step, m["update_ok"])
      if step % run.log_every == 0 or step == total_steps:
        m = jax.device_get(m)
        dt = (time.perf_counter() - t_last) / (run.log_every if step % run.log_every == 0 else 1)
        t_last = time.perf_counter()
        tokens = int(np.asarray(local["attention_mask"]).sum()) * jax.process_count()
        metrics = {k: float(np.asarray(v)) for k, v in m.items()}
        metrics.update(step_time_s=dt, tokens_per_s=tokens / dt)
        fl = objective.step_flops(cfg, *global_shapes["input_ids"], int(metrics["image_token_count"]), section)
        if peak:
          metrics.update(mfu=fl.total / dt / (peak * jax.device_count()),
                         mfu_backbone=fl.backbone / dt / (peak * jax.device_count()))
        stats = getattr(data_iter, "stats", None)
        if stats is not None:
          metrics.update({f"data/{k}": v for k, v in stats().items()})
        writer.scalars(step, metrics)
      guard.check(ckpt, writer)
      if run.sample_every and step % run.sample_every == 0 and is_main:
        _sample_grid(config, run, cfg, objective.export_params(ctx, step_fn, model_params(state.params, state.opt_state)),
                     writer, step, workdir)
      if ckpt.should_save(step) or step == total_steps:
        ckpt.save(step, state, data_iter, force=step == total_steps)
        last_saved = step
      if preemption.requested:
        if last_saved != step:
          ckpt.save(step, state, data_iter, force=True)
        preempted = True
        print(f"SIGTERM: saved step {step}, exiting", flush=True)
        break
  guard.check(ckpt, writer, final=True)
  ckpt.close()
  if run.export and step == run.steps and not preempted:
    trained = model_params(state.params, state.opt_state)
    exported = export_model(workdir, objective.export_params(ctx, step_fn, trained), config, run, step)
    objective.extra_exports(ctx, workdir, trained, step)
    if is_main:
      print(f"exported params to {exported}", flush=True)
  writer.close()
  return TrainResult(step=step, preempted=preempted, last_metrics=metrics)


class _PixelEncoder:
  """Encode-on-the-fly: pixel_values → VAE latents → patchified image tokens, a jitted program on the mesh."""

  def __init__(self, config, run: TrainConfig, mesh):
    src = run.vae_from
    if not src:
      raise ValueError("config.data.encode_on_the_fly needs config.train.vae_from (a model dir with vae_params/)")
    self.vae_cfg = VAEConfig.from_dict(params_io.read_model_config(src)["vae"])
    self.vae_params = params_io.load_params(Path(src) / "vae_params")
    self.mesh, patch = mesh, config.model.latent_patch_size
    self._fn = jax.jit(lambda vp, px: patchify(encode_latents(vp, self.vae_cfg, px), patch))

  def sharding(self, batch: int):
    return jax.sharding.NamedSharding(self.mesh, sharding.logical_to_spec(("act_batch",), (batch,), self.mesh))

  def __call__(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    batch = dict(batch)
    batch["image_tokens"] = self._fn(self.vae_params, batch.pop("pixel_values"))
    return batch


def _sample_grid(config, run: TrainConfig, cfg: ModelConfig, params: Any, writer: MetricWriter, step: int,
                 workdir: str) -> None:
  """Samples `config.train.sample_prompts` with the current params; writes a PNG grid and a TensorBoard image."""
  src = run.vae_from
  if not src or not Path(src, "vae_params").exists():
    return
  meta = params_io.read_model_config(src)
  tok_dir = Path(src, "tokenizer") if Path(src, "tokenizer").exists() else Path(config.data.tokenizer)
  sampler = Sampler(cfg, params, VAEConfig.from_dict(meta["vae"]), params_io.load_params(Path(src, "vae_params")),
                    NextStepTokenizer(tok_dir))
  out = sampler.text_to_image(list(run.sample_prompts), Options(
      height=run.sample_size, width=run.sample_size, steps=run.sample_steps, cfg=run.sample_cfg, positive_prompt=None,
      negative_prompt="", buckets=(64, 128, 256)))
  grid = make_grid(out.images, ncols=min(4, len(out.images)))
  save_png(Path(workdir) / "samples" / f"step_{step:08d}.png", grid)
  writer.image(step, "samples", grid)
