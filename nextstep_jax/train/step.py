"""The flow-matching objective ("fm"): CE + flow-matching loss, gradient accumulation, NaN/Inf guard, AdamW update.

Gradient accumulation scans over `microbatches` strided slices of the global batch (row i goes to micro-batch
i mod M, so each device's rows split locally). Every micro-batch loss is normalised by the *global* token counts
(computed from masks before the scan), so the summed gradients equal the one-step gradient exactly; the flow-
matching draws are made for the whole global batch for the same reason.
"""
from __future__ import annotations

from typing import Any

import jax
import optax

from nextstep_jax import sharding
from nextstep_jax.config import ModelConfig
from nextstep_jax.data.iterator import make_train_iterator
from nextstep_jax.models.nextstep import NextStep, combine_losses, draw_fm_noise, draw_input_noise, loss_counts
from nextstep_jax.train.flops import train_step_flops
from nextstep_jax.train.objective import Objective, StepContext, StepProgram, jit_step
from nextstep_jax.train.state import TrainState
from nextstep_jax.train.update import accumulate, guarded_update


def make_loss_fn(cfg: ModelConfig, apply=None):
  """loss_fn(params, batch, noise, u, counts, *input_noise) → (loss, terms); `apply(model, params, *args, **kw)`
  replaces `model.apply` (LoRA applies base + adapters, `train/lora.py`)."""
  model = NextStep(cfg)
  apply = apply or (lambda m, p, *a, **kw: m.apply(p, *a, **kw))

  def loss_fn(params, batch, noise, u, counts, *input_noise):
    extra = (input_noise[0][0],) if input_noise else ()  # (1, B, T, K) → (B, T, K)
    terms = apply(model, params, batch, noise, u, *extra, method=NextStep.loss_terms)
    return combine_losses(cfg, terms, counts)["loss"], terms
  return loss_fn


def loss_and_grads(cfg: ModelConfig, params: Any, batch: dict[str, jax.Array], key: jax.Array,
                   microbatches: int = 1, apply=None) -> tuple[jax.Array, dict[str, jax.Array], Any]:
  """(total loss, summed terms, fp32 grads of `params`) of a global batch, accumulated over `microbatches`
  (`apply`: `make_loss_fn`)."""
  counts = loss_counts(cfg, batch)
  b, slots = batch["image_tokens"].shape[:2]
  draws = draw_fm_noise(cfg, key, b, slots) + draw_input_noise(cfg, key, b, slots)
  loss_grad = jax.value_and_grad(make_loss_fn(cfg, apply), has_aux=True)
  grad_fn = lambda p, mb, n, uu, *extra: loss_grad(p, mb, n, uu, counts, *extra)
  (loss, terms), grads = accumulate(grad_fn, params, batch, draws, extras_axis=1, microbatches=microbatches)
  return loss, terms, grads


def train_step(cfg: ModelConfig, tx: optax.GradientTransformation, schedule: optax.Schedule, microbatches: int,
               state: TrainState, batch: dict[str, jax.Array], key: jax.Array,
               make_apply=None) -> tuple[TrainState, dict]:
  """One optimizer step. Updates are skipped (and counted) when the loss or gradient norm is not finite.
  `make_apply(step_key)` → the `apply` of `make_loss_fn` (LoRA: base + adapters, dropout keyed by the step)."""
  step_key = jax.random.fold_in(key, state.step)
  apply = None if make_apply is None else make_apply(step_key)
  loss, terms, grads = loss_and_grads(cfg, state.params, batch, step_key, microbatches, apply=apply)
  new_state, ok, grad_norm = guarded_update(tx, state, loss, grads)
  means = combine_losses(cfg, terms, terms)
  metrics = {"loss": loss, "text_loss": means["text_loss"], "image_loss": means["image_loss"], "grad_norm": grad_norm,
             "lr": schedule(state.step - state.skipped), "skipped_updates": new_state.skipped, "update_ok": ok,
             "text_token_count": terms["ce_count"], "image_token_count": terms["fm_count"] / cfg.fm_head_batch_mul}
  return new_state, metrics


def jit_train_step(cfg: ModelConfig, tx, schedule, microbatches: int, state_shardings: TrainState,
                   batch_shardings: dict[str, Any], mesh, donate: bool = True):
  """jit with explicit in/out shardings (state donated). Trace it under `sharding.use_mesh(mesh)`."""
  fn = lambda state, batch, key: train_step(cfg, tx, schedule, microbatches, state, batch, key)
  return jit_step(fn, state_shardings, batch_shardings, mesh, donate=donate)


class FlowMatching(Objective):
  """Pre-training / SFT / editing: CE on text + flow matching on image tokens over t2i-contract batches."""
  name = "fm"

  def dataset_iterator(self, data_config, process_index, process_count):
    return make_train_iterator(data_config, process_index, process_count)

  def _program(self, ctx: StepContext):
    with sharding.use_mesh(ctx.mesh):
      return jit_train_step(ctx.cfg, ctx.tx, ctx.schedule, ctx.run.microbatches, ctx.state_shardings,
                            ctx.batch_shardings, ctx.mesh)

  def make_step(self, ctx, init_params=None):
    return StepProgram(self._program(ctx))

  def abstract_step(self, ctx, abstract_state):
    return StepProgram(self._program(ctx))

  def step_flops(self, cfg, rows, seq_len, image_tokens, section=None):
    return train_step_flops(cfg, rows, seq_len, image_tokens)
