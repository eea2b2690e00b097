"""Preference alignment: flow-matching DPO (Diffusion-DPO form, spec §5) against a frozen reference model.

Batch = the t2i batch contract (`models/nextstep.py`) for the chosen ("winner") image plus its rejected ("loser")
image in the same slots: input_ids / attention_mask / positions / labels / image_loss_mask are shared (same
prompt, same token grid), `image_tokens` (B, T, D) are the winner's tokens, `rejected_image_tokens` (B, T, D)
the loser's (`data/preferences.py` builds such batches; `synthetic_pair_batch` fakes them).

Per pair i and model m ∈ {policy θ, reference}: e_m(x) = mean over the image's tokens, the fm_head_batch_mul
replicas and the 64 dims of (v̂_m(x_t, t) − (x − ε))², with the SAME (ε, t) draws for winner and loser and for
both models. With Δ_w = e_θ(x_w) − e_ref(x_w), Δ_l = e_θ(x_l) − e_ref(x_l):

    margin_i = −β/2 · (Δ_w − Δ_l)          (implicit reward margin; > 0 when the winner is favoured)
    L = mean_i −log σ(margin_i)  +  sft_weight · FM loss of the winners

The reference is a separate params tree with the policy's shardings (stored in `config.dpo.ref_dtype`, bf16 by
default), never in the optimizer and never differentiated (its errors are computed outside `value_and_grad`
and wrapped in `stop_gradient`). Micro-batch accumulation and the NaN/Inf guard come from `train/update.py`;
losses are normalised by global pair / token counts, so accumulation is exact.

`config.dpo` (`DpoConfig`): beta, sft_weight, ref_dtype, ref_from ("" = the stage's own initial params).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nextstep_jax import sharding
from nextstep_jax.config import DTYPES, ModelConfig
from nextstep_jax.data.packing import REJECTED
from nextstep_jax.data.preferences import make_pref_iterator
from nextstep_jax.models.layers import to_dtype
from nextstep_jax.models.nextstep import NextStep, draw_fm_noise, per_count, per_fm_row, placeholder_slots
from nextstep_jax.train import flops as flops_lib
from nextstep_jax.train.config import check, finite, section_dict, typed_view
from nextstep_jax.train.objective import Objective, StepContext, StepProgram, jit_step
from nextstep_jax.train.state import TrainState, init_state, load_init_params
from nextstep_jax.train.synthetic import synthetic_pair_batch
from nextstep_jax.train.update import accumulate, guarded_update

SUM_KEYS = ("dpo_sum", "margin_sum", "correct", "gap_w_sum", "gap_l_sum", "err_w_sum", "err_l_sum", "fm_sum")


@dataclasses.dataclass(frozen=True)
class DpoConfig:
  """`config.dpo`. β multiplies per-dimension mean squared errors, which move by ~1e-3 between models, hence the
  Diffusion-DPO-sized default."""
  beta: float = 5000.0
  sft_weight: float = 0.0  # weight of the winners' flow-matching loss added to the DPO loss
  ref_dtype: str = "bfloat16"  # the frozen reference's matrices
  ref_from: str = ""  # "" = the stage's initial params (config.train.init_from merged into a fresh init)

  @classmethod
  def from_config(cls, section: Any) -> "DpoConfig":
    return typed_view(cls, section, "config.dpo").validate()

  def validate(self) -> "DpoConfig":
    finite(self, "config.dpo", "beta", "sft_weight")
    check(self.beta > 0, f"config.dpo.beta={self.beta} must be > 0 (Diffusion-DPO scale: 500–5000)")
    check(self.sft_weight >= 0, f"config.dpo.sft_weight={self.sft_weight} must be >= 0")
    check(self.ref_dtype in DTYPES, f"config.dpo.ref_dtype={self.ref_dtype!r} is not one of {DTYPES}")
    return self


def dpo_section(**overrides) -> ml_collections.ConfigDict:
  """`config.dpo` with every field at its default, `overrides` applied."""
  return section_dict(DpoConfig, overrides, "config.dpo")


# ----------------------------------------------------------------------------------------------- loss


def fm_row_errors(module: NextStep, batch: dict[str, jax.Array], tokens: jax.Array, noise: jax.Array,
                  u: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-row flow-matching error sums and counts (B,), (B,) of `tokens` (B, T, D) in the batch's placeholders.

  Same computation as `NextStep.loss_terms`' image part (sum over rows of the sums = its fm_sum), kept per row.
  Apply with `model.apply(params, batch, tokens, noise, u, method=fm_row_errors)`.
  """
  _, t_slots, k = tokens.shape
  h, _ = module.hidden(module.embed_inputs(batch["input_ids"], tokens), batch["attention_mask"], batch.get("positions"))
  cond, slot_valid = module.slot_conditions(h, batch, t_slots)
  weight = (slot_valid & (batch["image_loss_mask"] > 0)).astype(jnp.float32)  # (B, T)
  x1 = tokens.astype(jnp.float32)[None]  # (1, B, T, D) against noise (mul, B, T, D)
  t = jax.nn.sigmoid(u.astype(jnp.float32))[..., None]
  x_t = t * x1 + (1 - t) * noise
  pred = module.velocity(x_t.reshape(-1, k), t.reshape(-1), jnp.tile(cond, (noise.shape[0], 1)))
  err = jnp.mean(jnp.square(pred.reshape(noise.shape) - (x1 - noise)), axis=-1)  # (mul, B, T)
  return jnp.sum(err * weight, axis=(0, 2)), noise.shape[0] * jnp.sum(weight, axis=1)


def pair_counts(cfg: ModelConfig, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Global normalisers from masks: pairs with at least one image token, winner FM rows (tokens × mul)."""
  _, valid = placeholder_slots(batch["input_ids"], cfg.image_placeholder_id, batch["image_tokens"].shape[1])
  per_row = jnp.sum(valid & (batch["image_loss_mask"] > 0), axis=1)
  return {"pairs": jnp.sum(per_row > 0).astype(jnp.float32),
          "fm_count": (jnp.sum(per_row) * cfg.fm_head_batch_mul).astype(jnp.float32)}


def pair_errors(model: NextStep, params: Any, batch: dict[str, jax.Array], noise: jax.Array, u: jax.Array):
  """(winner error sums, loser error sums, per-row counts) of one params tree on shared draws: one model pass over
  2B rows, winner and loser of a pair adjacent (rows stay on their device; one pass keeps the program's
  independent collectives few — XLA:CPU can deadlock on many concurrent ones with few cores)."""
  shared = {k: jnp.repeat(v, 2, axis=0) for k, v in batch.items() if k not in ("image_tokens", REJECTED)}
  w, l = batch["image_tokens"], batch[REJECTED]
  tokens = jnp.stack([w, l.astype(w.dtype)], axis=1).reshape((2 * w.shape[0],) + w.shape[1:])
  sums, counts = model.apply(params, shared, tokens, jnp.repeat(noise, 2, axis=1), jnp.repeat(u, 2, axis=1),
                             method=fm_row_errors)
  sums, counts = sums.reshape(-1, 2), counts.reshape(-1, 2)
  return sums[:, 0], sums[:, 1], counts[:, 0]


def dpo_objective(cfg: ModelConfig, dcfg: DpoConfig):
  """grad_fn(params, batch, noise, u, ref_params, counts) → ((loss, sums), grads) for one (micro-)batch."""
  model = NextStep(cfg)

  def grad_fn(params, batch, noise, u, ref_params, counts):
    ref_w, ref_l, _ = jax.lax.stop_gradient(pair_errors(model, ref_params, batch, noise, u))
    # the reference pass completes before the policy pass starts (its activations are freed first)
    params, ref_w, ref_l = jax.lax.optimization_barrier((params, ref_w, ref_l))

    def loss_fn(p):
      sum_w, sum_l, count = pair_errors(model, p, batch, noise, u)
      valid = (count > 0).astype(jnp.float32)
      e_w, e_l = per_count(sum_w, count), per_count(sum_l, count)
      gap_w, gap_l = e_w - per_count(ref_w, count), e_l - per_count(ref_l, count)
      margin = -0.5 * dcfg.beta * (gap_w - gap_l)
      dpo = jnp.sum(valid * jax.nn.softplus(-margin))  # −log σ(margin)
      loss = per_count(dpo, counts["pairs"]) + dcfg.sft_weight * per_fm_row(jnp.sum(sum_w), counts["fm_count"])
      sums = dict(zip(SUM_KEYS, (dpo, jnp.sum(valid * margin), jnp.sum(valid * (margin > 0)), jnp.sum(valid * gap_w),
                                 jnp.sum(valid * gap_l), jnp.sum(valid * e_w), jnp.sum(valid * e_l), jnp.sum(sum_w))))
      return loss, sums
    return jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grad_fn


def dpo_loss_and_grads(cfg: ModelConfig, dcfg: DpoConfig, params: Any, ref_params: Any, batch: dict[str, jax.Array],
                       key: jax.Array, microbatches: int = 1):
  """(total loss, summed metric terms, fp32 grads) of a global batch of pairs, accumulated over micro-batches."""
  counts = pair_counts(cfg, batch)
  b, slots = batch["image_tokens"].shape[:2]
  noise, u = draw_fm_noise(cfg, key, b, slots)
  grad_fn = dpo_objective(cfg, dcfg)
  fn = lambda p, mb, n, uu: grad_fn(p, mb, n, uu, ref_params, counts)
  (loss, sums), grads = accumulate(fn, params, batch, (noise, u), extras_axis=1, microbatches=microbatches)
  return loss, dict(sums, **counts), grads


def dpo_step(cfg: ModelConfig, dcfg: DpoConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
             microbatches: int, state: TrainState, ref_params: Any, batch: dict[str, jax.Array],
             key: jax.Array) -> tuple[TrainState, dict]:
  """One optimizer step on a batch of preference pairs (NaN/Inf guard as the FM step)."""
  loss, s, grads = dpo_loss_and_grads(cfg, dcfg, state.params, ref_params, batch, jax.random.fold_in(key, state.step),
                                      microbatches)
  new_state, ok, grad_norm = guarded_update(tx, state, loss, grads)
  per_pair = lambda k: per_count(s[k], s["pairs"])
  metrics = {"loss": loss, "dpo_loss": per_pair("dpo_sum"), "reward_margin": per_pair("margin_sum"),
             "reward_accuracy": per_pair("correct"), "error_w": per_pair("err_w_sum"),
             "error_l": per_pair("err_l_sum"), "error_w_gap": per_pair("gap_w_sum"),
             "error_l_gap": per_pair("gap_l_sum"), "sft_loss": per_fm_row(s["fm_sum"], s["fm_count"]),
             "grad_norm": grad_norm, "lr": schedule(state.step - state.skipped), "skipped_updates": new_state.skipped,
             "update_ok": ok, "pair_count": s["pairs"], "image_token_count": s["fm_count"] / cfg.fm_head_batch_mul}
  return new_state, metrics


def jit_dpo_step(cfg: ModelConfig, dcfg: DpoConfig, tx, schedule, microbatches: int, state_shardings: TrainState,
                 batch_shardings: dict[str, Any], mesh, donate: bool = True):
  """jit of `dpo_step(state, ref_params, batch, key)`; the reference (the params' shardings) is not donated."""
  fn = lambda state, ref, batch, key: dpo_step(cfg, dcfg, tx, schedule, microbatches, state, ref, batch, key)
  return jit_step(fn, state_shardings, batch_shardings, mesh, bound_shardings=state_shardings.params, donate=donate)


# ----------------------------------------------------------------------------------------------- reference


def as_reference(params: Any, dtype: str, shardings: Any) -> Any:
  """A fresh copy of `params` on `shardings` (never aliasing the policy, whose buffers get donated): matrices in
  `dtype` (with a bf16 compute dtype the model casts them to bf16 anyway), vectors — biases, norm scales, a
  negligible share of the memory, some used in fp32 — as they are."""
  dt = to_dtype(dtype)
  cast = lambda x: jnp.copy(x.astype(dt) if x.ndim >= 2 else x)
  return jax.jit(lambda p: jax.tree.map(cast, p), out_shardings=shardings)(params)


def reference_params(ctx: StepContext, init_params: Any = None) -> Any:
  """The frozen reference: `config.dpo.ref_from` if set, else the stage's initial params — `init_params` when
  the caller has them (fresh start), else rebuilt exactly as `train` built them (init_from merged into the
  fresh init of `ctx.init_rng`), so a resumed run gets the same reference."""
  dcfg: DpoConfig = ctx.section
  if dcfg.ref_from or init_params is None:
    src = dcfg.ref_from or ctx.run.init_from
    given = load_init_params(src, ctx.cfg, ctx.mesh) if src else None
    init_params = init_state(ctx.cfg, optax.identity(), ctx.mesh, ctx.init_rng, params=given).params
  return as_reference(init_params, dcfg.ref_dtype, ctx.state_shardings.params)


def step_flops(cfg: ModelConfig, pairs: int, seq_len: int, image_tokens: int) -> flops_lib.StepFlops:
  """Policy forward + backward and reference forward over winner and loser rows (4 forwards of 2·pairs rows);
  no LM head (DPO never computes logits). `image_tokens`: winner image tokens in the batch."""
  rows, img = 2 * pairs, 2 * image_tokens
  per_token = flops_lib.backbone_forward_flops_per_token(cfg, seq_len) - 2.0 * cfg.hidden_size * cfg.vocab_size
  head = img * cfg.fm_head_batch_mul * flops_lib.head_forward_flops_per_row(cfg) + 2.0 * cfg.hidden_size ** 2 * img
  return flops_lib.StepFlops(backbone=4.0 * rows * seq_len * per_token, head=4.0 * head)


# ----------------------------------------------------------------------------------------------- objective


class Dpo(Objective):
  """Preference pairs against a frozen reference (bound into the step; shardings of the policy's params)."""
  name, section_name = "dpo", "dpo"

  def config_view(self, config) -> DpoConfig:
    return DpoConfig.from_config(config.get("dpo", {}))

  def synthetic_batch(self, cfg, index, batch, seq_len, image_tokens, seed):
    return synthetic_pair_batch(cfg, index, batch, seq_len, image_tokens, seed)

  def dataset_iterator(self, data_config, process_index, process_count):
    return make_pref_iterator(data_config, process_index, process_count)

  def batch_extras(self, shapes):
    return {REJECTED: shapes["image_tokens"]}

  def _program(self, ctx: StepContext):
    with sharding.use_mesh(ctx.mesh):
      return jit_dpo_step(ctx.cfg, ctx.section, ctx.tx, ctx.schedule, ctx.run.microbatches, ctx.state_shardings,
                          ctx.batch_shardings, ctx.mesh)

  def make_step(self, ctx, init_params=None):
    return StepProgram(self._program(ctx), reference_params(ctx, init_params))

  def abstract_step(self, ctx, abstract_state):
    ref_dt = jnp.dtype(ctx.section.ref_dtype)
    ref = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, ref_dt if a.ndim >= 2 else a.dtype,
                                                      sharding=a.sharding), abstract_state.params)
    return StepProgram(self._program(ctx), ref)

  def step_flops(self, cfg, rows, seq_len, image_tokens, section=None):
    return step_flops(cfg, rows, seq_len, image_tokens)
