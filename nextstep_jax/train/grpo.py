"""NextStep-GRPO: on-policy RL of the whole model (backbone + flow head) with Flow-GRPO-style policy gradients.

One optimizer step = rollout → reward → update:
  1. rollout (`grpo_rollout.py`: `sampling/generate.py` with a log-prob sampler, `flow.LOGPROB_METHODS`): G samples
     per prompt, CFG off by default; per image token and flow step the Gaussian transition's next state and
     log-density are kept.
  2. reward: `config.grpo.reward` (`train/rewards.py`) on (prompts, uint8 images) — host side.
  3. update (one jitted program): `grpo_recompute.transition_logprobs` recomputes every transition's log-density in
     one teacher-forced backbone forward over prompt + image tokens (the sampler's masks and raw positions) and one
     head pass over every (token, flow step); group-normalised advantages A_i = (r_i − mean_g)/(std_g + 1e-4) clipped
     to ±adv_clip; groups with reward std < min_group_std or mean > max_group_mean are rejected (weight 0); per
     transition the PPO loss max(−A·ρ, −A·clip(ρ, 1 ± clip_range)), ρ = exp(Δlog p / K) (per-dimension log-ratio,
     Flow-GRPO's mean over latent dims, when logprob_per_dim), plus kl_weight · KL(π_θ ‖ π_ref) of the two Gaussians
     (same σ: ‖μ_θ − μ_ref‖² / 2σ², / K likewise), averaged over the accepted stochastic transitions of `train_steps`
     flow steps drawn per update (0 = all).
The frozen reference (kl_weight > 0) is DPO's machinery (`dpo.reference_params`: ref_from / ref_dtype). Rollout
batch contract (R = prompts × G rows, group-major): input_ids / attention_mask (R, P) left-padded prompt rows
(+ uncond_input_ids / uncond_attention_mask with CFG), states (R, n, S+1, K), logp (R, n, S), rewards (R,).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nextstep_jax import params_io, sharding
from nextstep_jax.config import ModelConfig, VAEConfig
from nextstep_jax.data.pipeline import batch_shardings
from nextstep_jax.models.nextstep import NextStep, per_count
from nextstep_jax.sampling import flow
from nextstep_jax.tokens import NextStepTokenizer
from nextstep_jax.train import flops as flops_lib
from nextstep_jax.train.config import check
from nextstep_jax.train.dpo import reference_params
from nextstep_jax.train.grpo_config import GrpoConfig
from nextstep_jax.train.grpo_recompute import transition_logprobs
from nextstep_jax.train.grpo_rollout import prompt_iterator, prompt_list, sample_rollout
from nextstep_jax.train.objective import Objective, StepContext, StepProgram, jit_step
from nextstep_jax.train.rewards import check_scores, load_reward
from nextstep_jax.train.state import TrainState
from nextstep_jax.train.update import accumulate, guarded_update

ROLLOUT_KEYS = ("input_ids", "attention_mask", "states", "logp", "rewards")
UNCOND_KEYS = ("uncond_input_ids", "uncond_attention_mask")


# ----------------------------------------------------------------------------------------------- loss


def group_advantages(gcfg: GrpoConfig, rewards_R: jax.Array) -> dict[str, jax.Array]:
  """Per-row advantages, per-row acceptance (its group passed the online rejection) and group statistics."""
  g = rewards_R.reshape(-1, gcfg.group_size).astype(jnp.float32)
  mean, std = jnp.mean(g, axis=1, keepdims=True), jnp.std(g, axis=1, keepdims=True)
  adv = jnp.clip((g - mean) / (std + 1e-4), -gcfg.adv_clip, gcfg.adv_clip)
  accept = (std >= gcfg.min_group_std) & (mean <= gcfg.max_group_mean)
  return {"advantage": adv.reshape(-1), "accept": jnp.broadcast_to(accept, g.shape).reshape(-1).astype(jnp.float32),
          "group_mean": mean[:, 0], "group_std": std[:, 0], "group_accept": accept[:, 0].astype(jnp.float32)}


SUM_KEYS = ("pg_sum", "kl_sum", "clipped", "approx_kl_sum", "ratio_sum")


def grpo_objective(cfg: ModelConfig, gcfg: GrpoConfig):
  """grad_fn(params, batch, step_idx, ref_params, count) → ((loss, sums), grads) for one (micro-)batch; `batch`
  carries per-row `advantage` and `accept`, `count` the global number of weighted transitions."""
  model = NextStep(cfg)
  k = cfg.token_dim
  norm = float(k) if gcfg.logprob_per_dim else 1.0

  def grad_fn(params, batch, step_idx, ref_params, count):
    stochastic = jnp.asarray(flow.logprob_steps(gcfg.flow_config()))[step_idx].astype(jnp.float32)
    weight = batch["accept"][:, None, None] * stochastic[None, None, :]  # (R, 1, J) → broadcast over tokens
    logp_old = batch["logp"][:, :, step_idx]
    ref_mean = None
    if ref_params is not None:
      _, ref_mean, _ = jax.lax.stop_gradient(transition_logprobs(model, ref_params, gcfg, batch, step_idx))
      params, ref_mean = jax.lax.optimization_barrier((params, ref_mean))

    def loss_fn(p):
      logp, mean, std = transition_logprobs(model, p, gcfg, batch, step_idx)
      log_ratio = (logp - logp_old) / norm
      ratio = jnp.exp(log_ratio)
      adv = batch["advantage"][:, None, None]
      pg = jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - gcfg.clip_range, 1 + gcfg.clip_range))
      w = jnp.broadcast_to(weight, pg.shape)
      kl = jnp.zeros_like(pg)
      if ref_mean is not None:
        safe = jnp.where(std > 0, std, 1.0)[None, None, :]
        kl = jnp.sum(jnp.square(mean - ref_mean), axis=-1) / (2 * jnp.square(safe)) / norm
      loss = per_count(jnp.sum(w * (pg + gcfg.kl_weight * kl)), count)
      sums = dict(zip(SUM_KEYS, (jnp.sum(w * pg), jnp.sum(w * kl),
                                 jnp.sum(w * (jnp.abs(ratio - 1) > gcfg.clip_range)),
                                 jnp.sum(w * 0.5 * jnp.square(log_ratio)), jnp.sum(w * ratio))))
      return loss, sums
    return jax.value_and_grad(loss_fn, has_aux=True)(params)
  return grad_fn


def draw_steps(gcfg: GrpoConfig, key: jax.Array) -> jax.Array:
  """The flow steps trained on this update (J,): all stochastic steps, or `train_steps` of them at random."""
  steps = jnp.asarray(gcfg.stochastic_steps(), jnp.int32)
  if not gcfg.train_steps or gcfg.train_steps >= steps.shape[0]:
    return steps
  return jnp.sort(jax.random.permutation(key, steps)[:gcfg.train_steps])


def grpo_loss_and_grads(cfg: ModelConfig, gcfg: GrpoConfig, params: Any, ref_params: Any,
                        batch: dict[str, jax.Array], key: jax.Array, microbatches: int = 1):
  """(loss, summed metric terms + group statistics, fp32 grads) of one rollout batch."""
  groups = group_advantages(gcfg, batch["rewards"])
  step_idx = draw_steps(gcfg, key)
  stochastic = jnp.asarray(flow.logprob_steps(gcfg.flow_config()))[step_idx]
  n = batch["states"].shape[1]
  count = jnp.sum(groups["accept"]) * n * jnp.sum(stochastic).astype(jnp.float32)
  mb_batch = dict(batch, advantage=groups["advantage"], accept=groups["accept"])
  grad_fn = grpo_objective(cfg, gcfg)
  fn = lambda p, mb: grad_fn(p, mb, step_idx, ref_params, count)
  (loss, sums), grads = accumulate(fn, params, mb_batch, microbatches=microbatches)
  return loss, dict(sums, count=count, **groups), grads


def grpo_step(cfg: ModelConfig, gcfg: GrpoConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
              microbatches: int, state: TrainState, ref_params: Any, batch: dict[str, jax.Array],
              key: jax.Array) -> tuple[TrainState, dict]:
  """One optimizer step on a rollout batch (NaN/Inf guard as the FM step)."""
  loss, s, grads = grpo_loss_and_grads(cfg, gcfg, state.params, ref_params, batch,
                                       jax.random.fold_in(key, state.step), microbatches)
  new_state, ok, grad_norm = guarded_update(tx, state, loss, grads)
  per = lambda name: per_count(s[name], s["count"])
  metrics = {"loss": loss, "pg_loss": per("pg_sum"), "kl": per("kl_sum"), "clip_fraction": per("clipped"),
             "approx_kl": per("approx_kl_sum"), "ratio_mean": per("ratio_sum"),
             "reward_mean": jnp.mean(batch["rewards"]), "reward_group_std": jnp.mean(s["group_std"]),
             "accepted_group_fraction": jnp.mean(s["group_accept"]), "grad_norm": grad_norm,
             "lr": schedule(state.step - state.skipped), "skipped_updates": new_state.skipped, "update_ok": ok,
             "transition_count": s["count"],
             "image_token_count": jnp.float32(batch["states"].shape[0] * batch["states"].shape[1])}
  return new_state, metrics


def jit_grpo_step(cfg: ModelConfig, gcfg: GrpoConfig, tx, schedule, microbatches: int, state_shardings: TrainState,
                  batch_shardings: dict[str, Any], mesh, with_reference: bool, donate: bool = True):
  """jit of `grpo_step(state, [ref_params,] batch, key)`; the reference (the params' shardings) is not donated."""
  if with_reference:
    fn = lambda state, ref, batch, key: grpo_step(cfg, gcfg, tx, schedule, microbatches, state, ref, batch, key)
    return jit_step(fn, state_shardings, batch_shardings, mesh, bound_shardings=state_shardings.params, donate=donate)
  fn = lambda state, batch, key: grpo_step(cfg, gcfg, tx, schedule, microbatches, state, None, batch, key)
  return jit_step(fn, state_shardings, batch_shardings, mesh, donate=donate)


def rollout_shapes(cfg: ModelConfig, gcfg: GrpoConfig, rows: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{key: (global shape, dtype)} of the update step's rollout batch for R = `rows`."""
  p, n, s, k = gcfg.prompt_len, gcfg.num_tokens, gcfg.flow_steps, cfg.token_dim
  out = {"input_ids": ((rows, p), jnp.int32), "attention_mask": ((rows, p), jnp.int32),
         "states": ((rows, n, s + 1, k), jnp.float32), "logp": ((rows, n, s), jnp.float32),
         "rewards": ((rows,), jnp.float32)}
  if gcfg.branches == 2:
    out.update({key: ((rows, p), jnp.int32) for key in UNCOND_KEYS})
  return out


# ----------------------------------------------------------------------------------------------- program


@dataclasses.dataclass
class GrpoProgram(StepProgram):
  """rollout (jitted sampler) → reward (host) → update (jitted per rollout-row count; bound: the reference or
  None). `lower` lowers the update step — policy + reference + parallel recompute — on an abstract rollout batch
  of the given batch's row count."""
  ctx: StepContext = None
  vae_cfg: VAEConfig | None = None
  vae_params: Any = None
  reward_fn: Any = None
  prompts: Sequence[str] = ()
  last_images: np.ndarray | None = None
  _updates: dict = dataclasses.field(default_factory=dict)

  @property
  def gcfg(self) -> GrpoConfig:
    return self.ctx.section

  def update(self, rows: int):
    """(jitted update step, rollout-batch shardings) for R = `rows` (built once per row count)."""
    if rows not in self._updates:
      ctx = self.ctx
      shapes = {k: s for k, (s, _) in rollout_shapes(ctx.cfg, self.gcfg, rows).items()}
      sh = batch_shardings(shapes, ctx.mesh)
      with sharding.use_mesh(ctx.mesh):
        jitted = jit_grpo_step(ctx.cfg, self.gcfg, ctx.tx, ctx.schedule, ctx.run.microbatches, ctx.state_shardings,
                               sh, ctx.mesh, with_reference=self.bound is not None)
      self._updates[rows] = (jitted, sh)
    return self._updates[rows]

  def rollout_batch(self, batch: dict[str, jax.Array], roll: dict[str, np.ndarray], rewards) -> dict[str, Any]:
    keys = ROLLOUT_KEYS[:2] + (UNCOND_KEYS if self.gcfg.branches == 2 else ())
    upd = {k: batch[k] for k in keys}
    upd.update(states=roll["states"], logp=roll["logp"], rewards=np.asarray(rewards, np.float32))
    return jax.device_put(upd, self.update(len(roll["logp"]))[1])

  def __call__(self, state: TrainState, batch: dict[str, jax.Array], key: jax.Array):
    step = int(jax.device_get(state.step))
    roll = sample_rollout(self.ctx.cfg, self.gcfg, self.vae_cfg, self.vae_params, state.params, batch,
                          jax.random.fold_in(jax.random.fold_in(key, step), 1))
    index = np.asarray(jax.device_get(batch["prompt_index"]))
    rewards = check_scores(self.reward_fn([self.prompts[i] for i in index], roll["images"]), len(index),
                           self.gcfg.reward)
    self.last_images = roll["images"]
    jitted = self.update(len(index))[0]
    return jitted(*self._args(state, self.rollout_batch(batch, roll, rewards), key))

  def lower(self, state, batch, key):
    rows = batch["input_ids"].shape[0]
    jitted, sh = self.update(rows)
    abstract = {k: jax.ShapeDtypeStruct(s, dt, sharding=sh[k])
                for k, (s, dt) in rollout_shapes(self.ctx.cfg, self.gcfg, rows).items()}
    return jitted.lower(*self._args(state, abstract, key))


def step_flops(cfg: ModelConfig, gcfg: GrpoConfig, rows: int, with_reference: bool) -> flops_lib.StepFlops:
  """The update step: policy forward + backward (3×) and reference forward (1×) of the teacher-forced pass over
  R·branches rows of P + n − 1 tokens (no LM head), and of the head over every (token, trained step). The rollout
  (the sampler program) is not included."""
  seq = gcfg.prompt_len + gcfg.num_tokens - 1
  b_rows = rows * gcfg.branches
  per_token = flops_lib.backbone_forward_flops_per_token(cfg, seq) - 2.0 * cfg.hidden_size * cfg.vocab_size
  steps = gcfg.train_steps or len(gcfg.stochastic_steps())
  head = b_rows * gcfg.num_tokens * (steps * flops_lib.head_forward_flops_per_row(cfg) + 2.0 * cfg.hidden_size ** 2)
  passes = 3.0 + float(with_reference)
  return flops_lib.StepFlops(backbone=passes * b_rows * seq * per_token, head=passes * head)


# ----------------------------------------------------------------------------------------------- objective


class Grpo(Objective):
  """NextStep-GRPO (module docstring): rollouts of the policy itself, a reward, PPO-clipped policy gradients."""
  name, section_name = "grpo", "grpo"

  def config_view(self, config) -> GrpoConfig:
    return GrpoConfig.from_config(config.get("grpo", {}))

  def data_iterator(self, config, cfg, run, process_index, process_count):
    gcfg = self.config_view(config)
    tokenizer = None
    if not run.synthetic_data:
      tok_dir = config.data.get("tokenizer") or (str(Path(run.vae_from, "tokenizer")) if run.vae_from else "")
      check(bool(tok_dir) and Path(tok_dir).is_dir(), f"GRPO needs a tokenizer: config.data.tokenizer={tok_dir!r} "
            f"is not a directory; pass --config.data.tokenizer=DIR")
      tokenizer = NextStepTokenizer(tok_dir)
    return prompt_iterator(gcfg, cfg, tokenizer, int(config.data.global_batch_size), process_index, process_count)

  def make_step(self, ctx, init_params=None):
    vae = (None, None)
    src = ctx.run.vae_from
    if src and Path(src, "vae_params").exists():
      vae = (VAEConfig.from_dict(params_io.read_model_config(src)["vae"]), params_io.load_params(Path(src, "vae_params")))
    gcfg: GrpoConfig = ctx.section
    bound = reference_params(ctx, init_params) if gcfg.kl_weight > 0 else None
    return GrpoProgram(None, bound, ctx=ctx, vae_cfg=vae[0], vae_params=vae[1],
                       reward_fn=load_reward(gcfg.reward, gcfg.reward_timeout_s), prompts=prompt_list(gcfg))

  def abstract_step(self, ctx, abstract_state):
    bound = None
    if ctx.section.kl_weight > 0:
      ref_dt = jnp.dtype(ctx.section.ref_dtype)
      bound = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, ref_dt if a.ndim >= 2 else a.dtype,
                                                          sharding=a.sharding), abstract_state.params)
    return GrpoProgram(None, bound, ctx=ctx)  # the update step only: no reward, prompts or VAE

  def step_flops(self, cfg, rows, seq_len, image_tokens, section=None):
    """The update step of `rows` rollouts as the section sets it (steps trained, CFG branches, reference)."""
    gcfg = section if section is not None else GrpoConfig(
        prompt_len=seq_len, grid_h=1, grid_w=max(image_tokens // max(rows, 1), 1))
    return step_flops(cfg, gcfg, rows, with_reference=gcfg.kl_weight > 0)
