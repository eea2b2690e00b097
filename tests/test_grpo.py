"""NextStep-GRPO (train/grpo*.py): the log-prob samplers' recorded transitions against the parallel teacher-forced
recompute (fp32 with and without CFG; bf16 drift measured), group advantages and online rejection, ratio 1 / KL 0
at policy = reference, the loss gradient against finite differences, and the config view's refusals."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.config import ConfigError, ModelConfig
from nextstep_jax.models.layers import parameter_free_layer_norm
from nextstep_jax.models.nextstep import NextStep
from nextstep_jax.sampling.generate import Spec, compiled_program
from nextstep_jax.train import grpo, grpo_config, grpo_recompute, grpo_rollout
from train_utils import TINY, random_params

GRID = (2, 2)
PROMPTS = ["p0", "p1", "p2"]


def gcfg(**kw) -> grpo_config.GrpoConfig:
  return dataclasses.replace(grpo_config.GrpoConfig(group_size=2, flow_steps=4, grid_h=GRID[0], grid_w=GRID[1],
                                                    prompt_len=10), **kw).validate()


def rollout(cfg: ModelConfig, params, g: grpo_config.GrpoConfig, seed=0, n_prompts=2):
  """Samples a rollout batch with the sampler program (independent noise per row); returns (batch, raw out)."""
  b = grpo_rollout.prompt_batch(g, cfg, None, n_prompts, 0, PROMPTS)
  r = b["input_ids"].shape[0]
  spec = Spec(num_images=r, branches=g.branches, prompt_len=g.prompt_len, grid_h=g.grid_h, grid_w=g.grid_w,
              flow=g.flow_config(), noise_repeat=r, use_norm=g.use_norm, decode=False)
  ids, mask = b["input_ids"], b["attention_mask"]
  if g.branches == 2:
    ids, mask = (np.concatenate([b[k], b["uncond_" + k]]) for k in ("input_ids", "attention_mask"))
  out = jax.device_get(compiled_program(cfg, None, spec)(params, None, ids, mask, None, jnp.float32(g.cfg),
                                                         jnp.float32(1.0), jax.random.key(seed), None))
  batch = {k: v for k, v in b.items() if k != "prompt_index"}
  batch.update(states=out["trajectory_states"], logp=out["trajectory_logp"],
               rewards=np.random.default_rng(seed).uniform(size=r).astype(np.float32))
  return batch, out


_ROLLOUTS = {}


def cached_rollout(cfg, params, g, n_prompts=2):
  """`rollout` of the module's params, shared by tests that sample the same way (one compile each)."""
  key = (cfg, g.flow_config(), g.cfg, n_prompts)
  if key not in _ROLLOUTS:
    _ROLLOUTS[key] = rollout(cfg, params, g, n_prompts=n_prompts)
  return _ROLLOUTS[key]


def recompute(cfg, params, g, batch):
  idx = jnp.arange(g.flow_steps)
  fn = lambda p, b: grpo_recompute.transition_logprobs(NextStep(cfg), p, g, b, idx)
  return jax.device_get(jax.jit(fn)(params, batch))


@pytest.fixture(scope="module")
def params():
  return jax.tree.map(jnp.asarray, random_params(TINY))


@pytest.mark.parametrize("sampler,cfg_scale", [("cps", 1.0), ("cps", 3.0), ("flow_sde", 1.0)])
def test_parallel_recompute_equals_sampler_fp32(params, sampler, cfg_scale):
  g = gcfg(sampler=sampler, cfg=cfg_scale)
  batch, out = cached_rollout(TINY, params, g)
  logp, mean, std = recompute(TINY, params, g, batch)
  stochastic = np.asarray(g.stochastic_steps())
  err = np.abs(logp - out["trajectory_logp"])
  k = TINY.token_dim
  print(f"{sampler} cfg={cfg_scale}: max |Δ log p| per transition {err.max():.2e} (sum over {k} dims, values up to "
        f"{np.abs(logp).max():.0f}, fp32 spacing there {np.spacing(np.float32(np.abs(logp).max())):.1e}); per dim "
        f"{err.max() / k:.1e}; max |Δ mean| {np.abs(mean - out['trajectory_means']).max():.1e}; "
        f"{err.size} transitions")
  np.testing.assert_array_equal(std, out["trajectory_stds"])
  assert err.max() <= 2e-5 and err.max() / k <= 1e-6
  assert np.all(std[stochastic] > 0) and (sampler != "cps" or std[-1] == 0)  # CPS: the step to t = 1 is exact
  # the recorded states are what the sampler emitted: the last state → the token fed back to the LM
  np.testing.assert_array_equal(np.asarray(parameter_free_layer_norm(jnp.asarray(out["trajectory_states"][:, :, -1]),
                                                                     1e-6)), out["tokens"])
  # and each transition's log-density is that of a real Gaussian step: z = (x' − μ)/σ ~ N(0, 1)
  z = (out["trajectory_states"][:, :, 1:] - out["trajectory_means"])[:, :, stochastic] / std[stochastic, None]
  assert 0.7 < float(np.std(z)) < 1.3


def test_bf16_drift_is_measured(params):
  """bf16 compute: sampler (KV-cached decode) vs recompute (one teacher-forced pass) disagree by rounding only."""
  cfg = dataclasses.replace(TINY, dtype="bfloat16")
  g = gcfg(sampler="cps")
  batch, out = rollout(cfg, params, g)
  logp, _, _ = recompute(cfg, params, g, batch)
  st = g.stochastic_steps()
  drift = np.abs(logp - out["trajectory_logp"])[:, :, st]
  per_dim = drift / cfg.token_dim
  print(f"bf16 cps: |Δ log p| per transition max {drift.max():.3f} mean {drift.mean():.3f}; per dim max "
        f"{per_dim.max():.2e} mean {per_dim.mean():.2e}; ratio exp(Δ/K) − 1 max {np.expm1(per_dim.max()):.2e}")
  assert np.all(np.isfinite(drift)) and per_dim.max() < 0.05


def test_group_advantages_and_rejection():
  g = gcfg(group_size=4, min_group_std=0.1, max_group_mean=0.9)
  r = jnp.asarray([1, 1, 1, 1,  0, 1, 0, 1,  0.5, 0.5, 0.5, 0.55,  0, 0, 0, 1], jnp.float32)
  out = jax.device_get(grpo.group_advantages(g, r))
  np.testing.assert_array_equal(out["group_accept"], [0, 1, 0, 1])  # all high; spread; too little spread; ok
  np.testing.assert_allclose(out["advantage"][4:8], np.array([-0.5, 0.5, -0.5, 0.5]) / (0.5 + 1e-4), rtol=1e-6)
  std4 = np.std([0, 0, 0, 1])
  np.testing.assert_allclose(out["advantage"][12:], (np.array([0, 0, 0, 1]) - 0.25) / (std4 + 1e-4), rtol=1e-6)
  np.testing.assert_array_equal(out["accept"], np.repeat([0, 1, 0, 1], 4))
  assert np.abs(out["advantage"]).max() <= g.adv_clip


def _loss(g, params, ref, batch, key=jax.random.key(5)):
  return jax.jit(lambda p, r, b: grpo.grpo_loss_and_grads(TINY, g, p, r, b, key))(params, ref, batch)


def test_policy_equals_reference_gives_ratio_one_and_zero_kl(params):
  g = gcfg(sampler="cps", kl_weight=0.5)
  batch, _ = cached_rollout(TINY, params, g)
  loss, s, _ = _loss(g, params, params, batch)
  ratio_mean = float(s["ratio_sum"]) / float(s["count"])
  print(f"step 0: ratio − 1 = {ratio_mean - 1:.1e}, KL = {float(s['kl_sum']) / float(s['count']):.1e}, clipped "
        f"{float(s['clipped'])}, approx-KL {float(s['approx_kl_sum']) / float(s['count']):.1e}")
  # KL: the reference pass and the differentiated policy pass are separate fusions (fp32 rounding of μ only)
  assert abs(ratio_mean - 1) <= 1e-6 and float(s["kl_sum"]) / float(s["count"]) <= 1e-12
  assert float(s["clipped"]) == 0.0
  # with ratio 1 the loss is −mean(A) over accepted transitions, 0 for group-normalised A
  assert abs(float(loss)) <= 1e-5


def test_loss_gradient_matches_finite_differences(params):
  g = gcfg(sampler="cps", kl_weight=0.3, clip_range=0.5, train_steps=2)  # 2 of CPS's 3 stochastic steps
  batch, _ = cached_rollout(TINY, params, g)
  rng = np.random.default_rng(1)
  ref = jax.tree.map(lambda x: x * (1 + 0.05 * rng.standard_normal(x.shape).astype(np.float32)), params)
  # a policy one step away from the sampling policy: ratios ≠ 1, the KL term non-zero
  policy = jax.tree.map(lambda x: x * (1 + 2e-3 * rng.standard_normal(x.shape).astype(np.float32)), params)
  _, s, grads = _loss(g, policy, ref, batch)
  print(f"ratio mean {float(s['ratio_sum']) / float(s['count']):.4f}, clipped {float(s['clipped'])}")
  # along the gradient plus a random component (the whole gradient's norm and a generic direction)
  d = jax.tree.map(lambda x: x + 1e-3 * rng.standard_normal(x.shape).astype(np.float32), grads)
  norm = math.sqrt(sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(d)))
  d = jax.tree.map(lambda x: x / norm, d)
  analytic = sum(float(jnp.sum(a * b)) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(d)))
  h = 1e-3
  f = lambda sgn: float(_loss(g, jax.tree.map(lambda p, v: p + sgn * h * v, policy, d), ref, batch)[0])
  fd = (f(1) - f(-1)) / (2 * h)
  print(f"directional derivative: analytic {analytic:.6e}, finite difference {fd:.6e}, rel {abs(fd - analytic) / abs(analytic):.1e}")
  assert abs(analytic) > 1e-3 and abs(fd - analytic) <= 2e-2 * abs(analytic)


@pytest.mark.parametrize("field,value,words", [
    ("sampler", "sde_a", "not one of"), ("group_size", 1, ">= 2"), ("noise_level", 1.5, "noise_level"),
    ("train_steps", 99, "train_steps"), ("cfg", 0.5, ">= 1"), ("ref_dtype", "fp8", "not one of")])
def test_config_refusals_name_the_field(field, value, words):
  with pytest.raises(ConfigError, match=words):
    grpo_config.GrpoConfig.from_config({field: value})


def test_step_flops_follow_the_section():
  """The loop's MFU counts the steps trained, the CFG branches and the reference the section sets."""
  obj = grpo.Grpo()
  base = obj.step_flops(TINY, 8, 10, 8 * 4, gcfg())  # cps, 4 steps: 3 stochastic ones trained
  h1, h2 = (obj.step_flops(TINY, 8, 10, 8 * 4, gcfg(train_steps=k)).head for k in (1, 2))
  assert base.head - h2 == pytest.approx(h2 - h1) and h2 - h1 > 0  # linear in the steps trained
  assert obj.step_flops(TINY, 8, 10, 8 * 4, gcfg(cfg=3.0)).total == pytest.approx(2 * base.total)
  assert obj.step_flops(TINY, 8, 10, 8 * 4, gcfg(kl_weight=0.1)).total == pytest.approx(base.total * 4 / 3)
