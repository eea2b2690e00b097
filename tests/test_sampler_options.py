"""Sampler options value-checked: every flow method against a numpy loop (Heun also against its closed form on a
linear velocity), the CFG schedules' per-token scales, seeds isolated from every other input, and the `sample` CLI's
PNGs equal byte for byte to the library's images for the same flags."""
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from nextstep_jax.images import save_png
from nextstep_jax.sampling import flow
from nextstep_jax.sampling.pipeline import Options, Sampler

from conftest import ROOT, subprocess_env

RNG = np.random.default_rng(0)
W = (RNG.standard_normal((8, 8)) / 3).astype(np.float32)
B = RNG.standard_normal(8).astype(np.float32)


def np_velocity(x, t):
  return np.tanh(x @ W) * (1.0 + t) + B * t


def jax_velocity(x, t, _):
  return jnp.tanh(x @ jnp.asarray(W)) * (1.0 + t) + jnp.asarray(B) * t


def np_shift(t, s):
  return t / (s - (s - 1) * t)


def np_sample(method, x, eps, n, s):
  """The samplers written from their definitions (module docstring of sampling/flow.py, official `sample`)."""
  x = x.astype(np.float64)

  def sde(x, t, t2, e):
    v = np_velocity(x, t)
    drift = v + (1 - t) * (t * v - x) / (1 - t)
    return x + drift * (t2 - t) + np.sqrt(2 * (1 - t)) * np.sqrt(t2 - t) * e

  if method == "sde_a":
    ts = np_shift(np.linspace(0, 0.96, n), s)
    for j in range(n - 1):
      x = sde(x, ts[j], ts[j + 1], eps[j])
    return x + 0.04 * np_velocity(x, ts[-1])
  if method == "sde_b":
    ts = np.append(np_shift(np.linspace(0, 1, n + 1)[:-1], s), 1.0)
    for j in range(n):
      x = sde(x, ts[j], ts[j + 1], eps[j])
    return x
  ts = np_shift(np.linspace(0, 1, n + 1), s)
  a = 0.7  # FlowConfig.noise_level's default
  for j in range(n):
    dt, v = ts[j + 1] - ts[j], np_velocity(x, ts[j])
    if method == "flow_sde":  # Flow-GRPO: dx = (v + g²/2·score) dt + g dW, g² = a²(1 − t)/t (t = 0 → ts[1])
      g2 = a * a * (1 - ts[j]) / (ts[j] if ts[j] > 0 else ts[1])
      x = x + (v + 0.5 * g2 * (ts[j] * v - x) / (1 - ts[j])) * dt + np.sqrt(g2 * dt) * eps[j]
    elif method == "cps":  # x' = t'·x̂_data + (1 − t')·(cos(aπ/2)·ε̂ + sin(aπ/2)·ε)
      x_data, noise = x + (1 - ts[j]) * v, x - ts[j] * v
      x = ts[j + 1] * x_data + (1 - ts[j + 1]) * (np.cos(a * np.pi / 2) * noise + np.sin(a * np.pi / 2) * eps[j])
    elif method == "euler":
      x = x + v * dt
    else:
      x = x + 0.5 * (v + np_velocity(x + v * dt, ts[j + 1])) * dt
  return x


@pytest.mark.parametrize("method", [m for m in flow.METHODS if m != "dpm_2m"])  # dpm_2m: test_flow_solvers.py
@pytest.mark.parametrize("shift", [1.0, 3.2])
def test_flow_method_matches_numpy_loop(method, shift):
  n = 6
  x0 = RNG.standard_normal((3, 8)).astype(np.float32)
  eps = RNG.standard_normal((n, 3, 8)).astype(np.float32)
  cfg = flow.FlowConfig(method, n, shift).validate()
  got = jax.jit(lambda x, e: flow.integrate(jax_velocity, x, cfg, lambda j: e[j]))(x0, eps)
  np.testing.assert_allclose(got, np_sample(method, x0, eps, n, shift), atol=2e-5)


def test_heun_on_a_linear_velocity_has_its_closed_form():
  """v = a·x: one Heun step multiplies x by 1 + a·dt + (a·dt)²/2 exactly."""
  a, n, s = -1.3, 5, 2.0
  ts = np_shift(np.linspace(0, 1, n + 1), s)
  factor = np.prod([1 + a * dt + (a * dt) ** 2 / 2 for dt in np.diff(ts)])
  x0 = RNG.standard_normal((2, 8)).astype(np.float32)
  got = flow.integrate(lambda x, t, _: a * x, jnp.asarray(x0), flow.FlowConfig("heun", n, s))
  np.testing.assert_allclose(got, x0 * factor, rtol=1e-5)
  euler = flow.integrate(lambda x, t, _: a * x, jnp.asarray(x0), flow.FlowConfig("euler", n, s))
  np.testing.assert_allclose(euler, x0 * np.prod([1 + a * dt for dt in np.diff(ts)]), rtol=1e-5)


def test_cfg_schedules_per_token():
  """constant; linear (Aug-2025) 1 + (cfg−1)(n−k)/n; linear_rise (Feb-2026) max(cfg/2, 1 + (cfg−1)k/n)."""
  n, cfg = 16, 7.0
  k = np.arange(n)
  want = {"constant": np.full(n, cfg), "linear": 1 + (cfg - 1) * (n - k) / n,
          "linear_rise": np.maximum(cfg / 2, 1 + (cfg - 1) * k / n)}
  for name, w in want.items():
    got = np.array([float(flow.guidance_scale(jnp.float32(cfg), name, jnp.int32(i), n)) for i in k])
    np.testing.assert_allclose(got, w, rtol=1e-6, err_msg=name)
  v = jnp.asarray(RNG.standard_normal((2 * 3, 8)), jnp.float32)
  c, u = np.asarray(v[:3]), np.asarray(v[3:])
  np.testing.assert_allclose(flow.combine_branches(v, 2, jnp.float32(4.0), jnp.float32(1.0)), u + 4 * (c - u),
                             atol=1e-5)


# ------------------------------------------------------------------------------------------- sampler / CLI

@pytest.fixture(scope="module")
def model_dir(production_model_dir):
  return production_model_dir


@pytest.fixture(scope="module")
def sampler(model_dir):
  return Sampler.from_checkpoint(model_dir)


def test_seed_changes_only_the_noise(sampler):
  """Only the seed differs: the images change; with the draws injected the seed has no effect at all; the same
  seed twice gives the same images."""
  opts = Options(height=16, width=16, steps=3, cfg=3.0, positive_prompt=None, negative_prompt="", buckets=(32,))
  prompts = ["a red cube", "sky"]
  a = sampler.text_to_image(prompts, Options(**{**opts.__dict__, "seed": 1}))
  b = sampler.text_to_image(prompts, Options(**{**opts.__dict__, "seed": 2}))
  a2 = sampler.text_to_image(prompts, Options(**{**opts.__dict__, "seed": 1}))
  np.testing.assert_array_equal(a.images, a2.images)
  np.testing.assert_array_equal(a.extras["prompt_ids"], b.extras["prompt_ids"])
  assert np.abs(a.tokens - b.tokens).min() > 0  # every token element moved
  draws = RNG.standard_normal((16, 3, 1, 64)).astype(np.float32)
  a_inj = sampler.text_to_image(prompts, Options(**{**opts.__dict__, "seed": 1}), noise_draws=draws)
  b_inj = sampler.text_to_image(prompts, Options(**{**opts.__dict__, "seed": 2}), noise_draws=draws)
  np.testing.assert_array_equal(a_inj.tokens, b_inj.tokens)


CLI_FLAGS = dict(size="16x16", cfg="3.0", cfg_schedule="linear_rise", steps="3", sampler="heun", seed="5",
                 positive_prompt="masterpiece", negative_prompt="blurry", num_images="2")


def test_sample_cli_png_equals_library_output_byte_for_byte(model_dir, sampler, tmp_path):
  out = tmp_path / "cli" / "o.png"
  out.parent.mkdir()
  args = [f"--{k.replace('_', '-')}={v}" for k, v in CLI_FLAGS.items()]
  proc = subprocess.run([sys.executable, "-m", "nextstep_jax.cli", "sample", "--checkpoint", str(model_dir),
                         "--prompt", "a red cube", "--prompt", "two dogs", "--no-norm", *args, "--out", str(out)],
                        capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  opts = Options(height=16, width=16, cfg=3.0, cfg_schedule="linear_rise", steps=3, method="heun", seed=5,
                 use_norm=False, positive_prompt="masterpiece", negative_prompt="blurry", num_images_per_prompt=2)
  lib = sampler.text_to_image(["a red cube", "two dogs"], opts).images
  assert lib.shape == (4, 16, 16, 3)
  for i, img in enumerate(lib):
    cli_png = out.with_name(f"o_{i}.png")
    np.testing.assert_array_equal(np.asarray(Image.open(cli_png).convert("RGB")), img, err_msg=f"image {i}")
    ref = save_png(tmp_path / f"lib_{i}.png", img)
    assert cli_png.read_bytes() == Path(ref).read_bytes()
