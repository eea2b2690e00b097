"""`train(config, workdir)`: one curriculum stage, start to finish, resumable at any point.

Start-up order: own checkpoint in WORKDIR (exact resume: state + data position) → `config.train.init_from`
(previous stage's params, fresh optimizer; parameters it lacks, e.g. the head when starting from a plain Qwen
checkpoint, keep their fresh initialisation) → fresh init. SIGTERM (preemption) saves a checkpoint at the next
step boundary and returns normally (exit code 0). Logging and exports happen on process 0.
"""
from __future__ import annotations

import dataclasses
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nextstep_jax import params_io, sharding
from nextstep_jax.checkpoint import Checkpointer
from nextstep_jax.config import ModelConfig, VAEConfig
from nextstep_jax.data.buckets import bucket_grids
from nextstep_jax.models.image_grid import check_grids_fit
from nextstep_jax.train import flops as flops_lib
from nextstep_jax.train.metrics import MetricWriter
from nextstep_jax.train.optimizer import make_optimizer, model_params
from nextstep_jax.train.state import init_state, state_shardings
from nextstep_jax.train.step import jit_train_step


@dataclasses.dataclass
class TrainResult:
  step: int
  preempted: bool
  last_metrics: dict[str, float]


class _Preemption:
  """Turns SIGTERM into a flag checked at step boundaries."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not in the main thread (e.g. some test runners): preemption saves are then off
      self._old = None
    return self

  def _handle(self, *_):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def make_data_iterator(config, cfg: ModelConfig):
  """Process-local batch iterator: synthetic (config.train.synthetic_data) or the Grain pipeline."""
  if config.train.synthetic_data:
    from nextstep_jax.train.synthetic import synthetic_iterator
    d = config.data
    return synthetic_iterator(cfg, d.global_batch_size, d.seq_len, d.max_image_tokens or d.seq_len, d.seed,
                              jax.process_index(), jax.process_count())
  from nextstep_jax.data.pipeline import make_iterator
  return make_iterator(config.data, jax.process_index(), jax.process_count())


def load_init_params(path: str, cfg: ModelConfig, mesh) -> Any:
  """Params of a previous stage: an export dir (params/) or a training workdir (its latest checkpoint)."""
  from etils import epath
  from nextstep_jax.models.nextstep import abstract_params
  root = epath.Path(path)
  if (root / "params").exists():
    return params_io.load_params(root / "params")
  if (root / "checkpoints").exists():
    abstract, names = abstract_params(cfg)
    shardings = sharding.tree_shardings(names, abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    ckpt = Checkpointer(path, save_every=1)
    try:
      return ckpt.restore_params(None, target)
    finally:
      ckpt.close()
  raise FileNotFoundError(f"config.train.init_from={path!r} is neither an export (params/) nor a training "
                          f"workdir (checkpoints/); point it at the previous stage's WORKDIR or WORKDIR/export")


def export_model(workdir: str, state_params: Any, config, step: int) -> Path:
  """Params-only model dir at WORKDIR/export (atomic rename), with the VAE and tokenizer of `vae_from`.
  Called by every process of a multi-host job (a collective params save); process 0 writes the rest."""
  from jax.experimental import multihost_utils
  out = Path(workdir) / "export"
  tmp = Path(workdir) / "export.tmp"
  if jax.process_index() == 0:
    shutil.rmtree(tmp, ignore_errors=True)
  multihost_utils.sync_global_devices("export_model:clean")
  params_io.save_params(tmp / "params", state_params)
  if jax.process_index() != 0:
    return out
  sections = {"model": ModelConfig.from_dict(config.model), "train": {"step": step}}
  src = config.train.vae_from
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
  t = config.train
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = make_optimizer(t)
  abstract, shardings = state_shardings(cfg, tx, mesh)
  # --- objective dispatch: "fm" (pre-training / SFT) or "dpo" (preference pairs, nextstep_jax/train/dpo.py)
  objective = t.get("objective", "fm")
  if objective not in ("fm", "dpo"):
    raise ValueError(f"config.train.objective={objective!r} is not one of fm, dpo")
  if objective == "dpo":
    from nextstep_jax.train import dpo
  if not t.synthetic_data:
    d = config.data
    check_grids_fit(cfg, bucket_grids(d.resolution, d.down_factor, d.buckets),
                    "lower config.data.resolution or raise model.base_image_grid_size")
  data_iter = dpo.make_data_iterator(config, cfg) if objective == "dpo" else make_data_iterator(config, cfg)
  # --- end objective dispatch
  ckpt = Checkpointer(workdir, t.save_every, t.keep, t.async_checkpoint, model_config=cfg)
  is_main = jax.process_index() == 0
  key = jax.random.key(t.seed)

  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(start, abstract, data_iter)
    print(f"resumed from {ckpt.directory}/{start}", flush=True)
  else:
    given = load_init_params(t.init_from, cfg, mesh) if t.init_from else None
    state = init_state(cfg, tx, mesh, jax.random.fold_in(key, 1), params=given)
    start = 0
    if given is not None:
      print(f"initialised from {t.init_from} (fresh optimizer)", flush=True)
  writer = MetricWriter(workdir, enabled=is_main, resume_step=start)

  from nextstep_jax.data.pipeline import batch_shardings, to_global
  first = next(data_iter)
  global_shapes = {k: (v.shape[0] * jax.process_count(),) + v.shape[1:] for k, v in first.items()}
  b_sh = batch_shardings(global_shapes, mesh)
  encoder = _PixelEncoder(config, mesh) if "pixel_values" in first else None
  if encoder is not None:
    b_sh = {k: v for k, v in b_sh.items() if k != "pixel_values"}
    b_sh["image_tokens"] = encoder.sharding(global_shapes["pixel_values"][0])
  if objective == "dpo":  # the frozen reference = this stage's initial params (rebuilt the same way on resume)
    step_fn = dpo.make_step_fn(config, cfg, tx, schedule, shardings, b_sh, mesh, jax.random.fold_in(key, 1),
                               state.params if start == 0 else None)
  else:
    with sharding.use_mesh(mesh):
      step_fn = jit_train_step(cfg, tx, schedule, t.microbatches, shardings, b_sh, mesh)
  step_flops = dpo.step_flops if objective == "dpo" else flops_lib.train_step_flops
  peak = flops_lib.peak_flops_per_device(jax.devices()[0].device_kind, t.peak_flops_per_device)
  total_steps = t.steps if max_steps is None else min(t.steps, max_steps)
  step, metrics, preempted, last_saved = start, {}, False, start
  pending = first
  with _Preemption() as preemption, sharding.use_mesh(mesh):
    t_last = time.perf_counter()
    while step < total_steps:
      local = pending if pending is not None else next(data_iter)
      pending = None
      batch = to_global(local, mesh)
      if encoder is not None:
        batch = encoder(batch)
      state, m = step_fn(state, batch, key)
      step += 1
      if step % t.log_every == 0 or step == total_steps:
        m = jax.device_get(m)
        dt = (time.perf_counter() - t_last) / (t.log_every if step % t.log_every == 0 else 1)
        t_last = time.perf_counter()
        tokens = int(np.asarray(local["attention_mask"]).sum()) * jax.process_count()
        metrics = {k: float(np.asarray(v)) for k, v in m.items()}
        metrics.update(step_time_s=dt, tokens_per_s=tokens / dt)
        fl = step_flops(cfg, *global_shapes["input_ids"], int(metrics["image_token_count"]))
        if peak:
          metrics.update(mfu=fl.total / dt / (peak * jax.device_count()),
                         mfu_backbone=fl.backbone / dt / (peak * jax.device_count()))
        stats = getattr(data_iter, "stats", None)
        if stats is not None:
          metrics.update({f"data/{k}": v for k, v in stats().items()})
        writer.scalars(step, metrics)
      if t.sample_every and step % t.sample_every == 0 and is_main:
        _sample_grid(config, cfg, model_params(state.params, state.opt_state), writer, step, workdir)
      if ckpt.should_save(step) or step == total_steps:
        ckpt.save(step, state, data_iter, force=step == total_steps)
        last_saved = step
      if preemption.requested:
        if last_saved != step:
          ckpt.save(step, state, data_iter, force=True)
        preempted = True
        print(f"SIGTERM: saved step {step}, exiting", flush=True)
        break
  ckpt.close()
  if t.export and step == t.steps and not preempted:
    exported = export_model(workdir, model_params(state.params, state.opt_state), config, step)
    if is_main:
      print(f"exported params to {exported}", flush=True)
  writer.close()
  return TrainResult(step=step, preempted=preempted, last_metrics=metrics)


class _PixelEncoder:
  """Encode-on-the-fly: pixel_values → VAE latents → patchified image tokens, a jitted program on the mesh."""

  def __init__(self, config, mesh):
    from nextstep_jax.models.flux_vae import encode_latents
    from nextstep_jax.models.latents import patchify
    src = config.train.vae_from
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


def _sample_grid(config, cfg: ModelConfig, params: Any, writer: MetricWriter, step: int, workdir: str) -> None:
  """Samples `config.train.sample_prompts` with the current params; writes a PNG grid and a TensorBoard image."""
  from nextstep_jax.images import make_grid, save_png
  from nextstep_jax.sampling.pipeline import Options, Sampler
  src = config.train.vae_from
  if not src or not Path(src, "vae_params").exists():
    return
  meta = params_io.read_model_config(src)
  from nextstep_jax.tokens import NextStepTokenizer
  tok_dir = Path(src, "tokenizer") if Path(src, "tokenizer").exists() else Path(config.data.tokenizer)
  sampler = Sampler(cfg, params, VAEConfig.from_dict(meta["vae"]), params_io.load_params(Path(src, "vae_params")),
                    NextStepTokenizer(tok_dir))
  t = config.train
  out = sampler.text_to_image(list(t.sample_prompts), Options(
      height=t.sample_size, width=t.sample_size, steps=t.sample_steps, cfg=t.sample_cfg, positive_prompt=None,
      negative_prompt="", buckets=(64, 128, 256)))
  grid = make_grid(out.images, ncols=min(4, len(out.images)))
  save_png(Path(workdir) / "samples" / f"step_{step:08d}.png", grid)
  writer.image(step, "samples", grid)
