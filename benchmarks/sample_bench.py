"""Sampling throughput on CPU with the issue's bench config, vs a naive per-token Python loop of jitted steps.

Bench config (the one the PyTorch original was timed with on this machine kind): backbone hidden 768,
intermediate 2048, 12 layers, 12/4 heads (head_dim 64), vocab 1000, q/k/v bias; head width 256 × 4 blocks;
16 latent channels, patch 2; 256×256 → 256 image tokens; 40-token caption; cfg 7.5 (2 branches); 20 steps;
shift 1.0; use_norm; fp32; random weights. The prompt rows are built by the sampler's own prompt code
(`NextStepTokenizer.t2i_cfg_rows` with a byte tokenizer: caption + `<|image_area|>16*16<|begin_of_image|>`).

  python benchmarks/sample_bench.py [--images 1 4] [--repeats 3] [--skip-naive] [--skip-vae] [--int8]

Prints image tokens/s (VAE decode excluded), compile time, the per-token backbone/head split, the naive-loop
ratio, and the real Flux-size VAE decode time at 256². `--int8` instead times fp32 and int8 decoder kernels
(`models/quant.py`) alternately, `--repeats` rounds each. Alternate/median timings: CPU speed drifts (JAX_NOTES §2).
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import timed  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nextstep_jax.config import ModelConfig, VAEConfig, flux_vae  # noqa: E402
from nextstep_jax.models import quant  # noqa: E402
from nextstep_jax.models.nextstep import NextStep, init_fn  # noqa: E402
from nextstep_jax.models.qwen2 import init_cache  # noqa: E402
from nextstep_jax.sampling import decode_layout, flow  # noqa: E402
from nextstep_jax.sampling.decode_layout import split_for_decode  # noqa: E402
from nextstep_jax.sampling.generate import Spec, compiled_program  # noqa: E402
from nextstep_jax.tokens import (BOI_TOKEN, BYTE_EOS_TOKEN, EOI_TOKEN, IMAGE_AREA_TOKEN,  # noqa: E402
                                 IMAGE_PLACEHOLDER_TOKEN, PAD_TOKEN, NextStepTokenizer, byte_tokenizer_ids, left_pad,
                                 make_byte_tokenizer)

_IDS = byte_tokenizer_ids()
BENCH = dict(vocab_size=1000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=4,
             head_dim=64, attention_bias=True, fm_head_dim=256, fm_head_layers=4, latent_channels=16,
             latent_patch_size=2, eos_token_id=_IDS[BYTE_EOS_TOKEN], pad_token_id=_IDS[PAD_TOKEN],
             image_area_id=_IDS[IMAGE_AREA_TOKEN], boi_id=_IDS[BOI_TOKEN], eoi_id=_IDS[EOI_TOKEN],
             image_placeholder_id=_IDS[IMAGE_PLACEHOLDER_TOKEN])
GRID = 16  # 256 px / (8 · 2)
CAPTION, STEPS, CFG = 40, 20, 7.5
CAPTION_TEXT, NEGATIVE_TEXT = "a photo of a red cube on a wooden table.", "lowres, bad anatomy, blurry, jpeg noise."


def _setup():
  cfg = ModelConfig.from_dict(BENCH)
  _, init = init_fn(cfg)
  params = nn.unbox(jax.jit(init)(jax.random.key(0)))  # plain arrays, as a loaded checkpoint holds
  # make the (zero-initialised) head layers non-trivial, as trained weights are
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
  return cfg, params


@functools.lru_cache(maxsize=1)
def _tokenizer() -> NextStepTokenizer:
  return NextStepTokenizer(make_byte_tokenizer(tempfile.mkdtemp()))


def _prompt(images: int):
  """CFG rows from the sampler's prompt code: [caption + generation prefix] × images, [negative + prefix] × images."""
  tok = _tokenizer()
  assert len(CAPTION_TEXT) == len(NEGATIVE_TEXT) == CAPTION
  rows = tok.t2i_cfg_rows([CAPTION_TEXT] * images, GRID, GRID, 1, None, NEGATIVE_TEXT)
  ids, mask = left_pad(rows, BENCH["pad_token_id"], (max(len(r) for r in rows),))
  return jnp.asarray(ids), jnp.asarray(mask)


def _program(cfg, params, images: int, unstack: bool = True):
  """(compile seconds, compiled Sampler program, its arguments); layers and head blocks as separate buffers unless
  `unstack` is False (scanned stacks)."""
  params = split_for_decode(params) if unstack else params
  ids, mask = _prompt(images)
  spec = Spec(num_images=images, branches=2, prompt_len=ids.shape[1], grid_h=GRID, grid_w=GRID,
              flow=flow.FlowConfig("sde_a", STEPS, 1.0), noise_repeat=images, decode=False)
  args = (params, None, ids, mask, None, jnp.float32(CFG), jnp.float32(1.0), jax.random.key(0), None)
  t0 = time.perf_counter()
  compiled = compiled_program(cfg, None, spec).lower(*args).compile()
  return time.perf_counter() - t0, compiled, args


def fused(cfg, params, images: int, repeats: int, unstack: bool = True):
  compile_s, compiled, args = _program(cfg, params, images, unstack)
  _, run_s, out = timed(compiled, *args, repeats=repeats)
  assert np.isfinite(np.asarray(out["tokens"])).all()
  return compile_s, run_s


def int8_vs_fp32(cfg, params, images: int, repeats: int):
  """Alternating rounds of the fp32 and the int8-kernel program: (median fp32 s, median int8 s, token diff)."""
  runs = {"fp32": _program(cfg, params, images), "int8": _program(cfg, quant.quantize_params(params), images)}
  outs = {name: jax.block_until_ready(c(*a)) for name, (_, c, a) in runs.items()}
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, (_, compiled, args) in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times[name].append(time.perf_counter() - t0)
  diff = float(np.abs(np.asarray(outs["int8"]["tokens"]) - np.asarray(outs["fp32"]["tokens"])).mean())
  return statistics.median(times["fp32"]), statistics.median(times["int8"]), diff


def split(cfg, params, images: int, repeats: int):
  """Per-token cost of the LM step alone and the head sampler alone (each in its own fori_loop program)."""
  model, rows, n = NextStep(cfg), 2 * images, GRID * GRID
  s_len = _prompt(images)[0].shape[1] + n
  key_valid = jnp.ones((rows, s_len), bool)

  decode_params = split_for_decode(params)

  @jax.jit
  def lm_only(dp, emb):
    cache = decode_layout.init_cache(cfg, rows, s_len, jnp.float32, per_layer=True)
    base = {"params": dp["params"]}
    def body(k, carry):
      cache, e = carry
      h, cache = decode_layout.hidden(model, base, dp["unstacked_layers"], e, key_valid, cache, k)
      return cache, e + 1e-6 * h
    return jax.lax.fori_loop(0, n, body, (cache, emb))[1]

  fcfg = flow.FlowConfig("sde_a", STEPS, 1.0)
  times = jnp.asarray(flow.time_grid(fcfg))

  @jax.jit
  def head_only(dp, c):
    base, blocks = {"params": dp["params"]}, dp["unstacked_head_blocks"]
    def body(k, x):
      mods = model.apply(base, times, c + 1e-6 * k, blocks, method=NextStep.head_modulations)
      v_fn = lambda x, t, i: flow.combine_branches(model.apply(
          base, jnp.tile(x, (2, 1)), jax.tree.map(lambda m: m[i], mods), blocks,
          method=NextStep.velocity_from_modulations), 2, CFG, 1.0)
      return flow.integrate(v_fn, x, fcfg, lambda j: jnp.full_like(x, 0.1 * j)) * 0.5
    return jax.lax.fori_loop(0, n, body, jnp.ones((images, cfg.token_dim)))

  emb = jnp.ones((rows, 1, cfg.hidden_size)) * 0.01
  c = jnp.ones((rows, cfg.hidden_size)) * 0.01
  _, lm_s, _ = timed(lm_only, decode_params, emb, repeats=repeats)
  _, head_s, _ = timed(head_only, decode_params, c, repeats=repeats)
  return lm_s / n, head_s / n


def naive(cfg, params, images: int):
  """The same work as a per-token Python loop over jitted single steps (LM step, head sampling)."""
  model, rows, n = NextStep(cfg), 2 * images, GRID * GRID
  ids, mask = _prompt(images)
  s_len = ids.shape[1] + n
  key_valid = jnp.concatenate([mask.astype(bool), jnp.ones((rows, n), bool)], axis=1)
  fcfg = flow.FlowConfig("sde_a", STEPS, 1.0)
  prefill = jax.jit(lambda p, i, c: model.apply(p, model.apply(p, i, None, method=NextStep.embed_inputs), key_valid,
                                                None, c, 0, method=NextStep.hidden))
  lm_step = jax.jit(lambda p, e, c, k: model.apply(p, e, key_valid, None, c, k, method=NextStep.hidden))

  @jax.jit
  def head_step(p, h_last, key):
    c = model.apply(p, h_last, method=NextStep.condition)
    d = jax.random.normal(key, (STEPS, images, cfg.token_dim))
    v_fn = lambda x, t, _: flow.combine_branches(model.apply(p, jnp.tile(x, (2, 1)), jnp.full((rows,), t), c,
                                                             method=NextStep.velocity), 2, CFG, 1.0)
    tok = flow.integrate(v_fn, d[0], fcfg, lambda j: d[j + 1])
    return model.apply(p, jnp.tile(tok, (2, 1)), method=NextStep.embed_image_token), tok

  def run():
    h, cache = prefill(params, ids, init_cache(cfg, rows, s_len, jnp.float32))
    h_last = h[:, -1]
    for k in range(n):
      emb, _ = head_step(params, h_last, jax.random.key(k))
      if k < n - 1:
        h, cache = lm_step(params, emb, cache, ids.shape[1] + k)
        h_last = h[:, 0]
    return jax.block_until_ready(h_last)
  run()  # compile
  t0 = time.perf_counter()
  run()
  return time.perf_counter() - t0


def vae_decode(repeats: int):
  from nextstep_jax.models.flux_vae import decode_latents, init_params
  vcfg = VAEConfig.from_dict(flux_vae())
  vparams = init_params(vcfg, jax.random.key(0), image_size=16)
  z = jax.random.normal(jax.random.key(1), (1, 32, 32, 16))
  first, steady, _ = timed(decode_latents, vparams, vcfg, z, repeats=repeats)
  return first - steady, steady


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--images", type=int, nargs="+", default=[1, 4])
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip-naive", action="store_true")
  ap.add_argument("--skip-vae", action="store_true")
  ap.add_argument("--int8", action="store_true", help="only time int8 vs fp32 decoder kernels, alternating")
  args = ap.parse_args()
  cfg, params = _setup()
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"bench model: {n_params / 1e6:.1f}M parameters (fp32), {GRID * GRID} image tokens, {STEPS} flow steps, "
        f"CFG 2 branches, prompt {_prompt(1)[0].shape[1]} tokens (official layout: caption {CAPTION} + "
        f"'<|image_area|>{GRID}*{GRID}<|begin_of_image|>'); devices: {jax.devices()[0].device_kind} "
        f"×{jax.device_count()}")
  if args.int8:
    for images in args.images:
      f32, i8, diff = int8_vs_fp32(cfg, params, images, args.repeats)
      tok = images * GRID * GRID
      print(f"{images} image(s): fp32 {tok / f32:6.1f} image tokens/s, int8 {tok / i8:6.1f} image tokens/s "
            f"({f32 / i8:.2f}×; medians of {args.repeats} alternating rounds); mean |Δtoken| {diff:.3f}", flush=True)
    return
  for images in args.images:
    compile_s, run_s = fused(cfg, params, images, args.repeats)
    _, scan_s = fused(cfg, params, images, args.repeats, unstack=False)
    tps = images * GRID * GRID / run_s
    lm, head = split(cfg, params, images, args.repeats)
    line = (f"{images} image(s) (batch {2 * images}): {tps:6.1f} image tokens/s, {run_s:.2f} s/batch, "
            f"{run_s / images:.2f} s/image, compile {compile_s:.1f} s; per token: backbone {lm * 1e3:.2f} ms, "
            f"head {head * 1e3:.2f} ms; scanned-layer variant {images * GRID * GRID / scan_s:.1f} tokens/s")
    if not args.skip_naive:
      naive_s = naive(cfg, params, images)
      line += f"; naive per-token loop {naive_s:.2f} s ({naive_s / run_s:.2f}× slower)"
    print(line, flush=True)
  if not args.skip_vae:
    c, d = vae_decode(args.repeats)
    print(f"VAE decode (Flux size, 256², 1 image): {d:.2f} s steady, compile ≈ {c:.1f} s")


if __name__ == "__main__":
  main()
