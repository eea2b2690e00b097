"""Sampler settings on the demo model: head evaluations, seconds and quality per image, one row per setting.

  python benchmarks/sampling_frontier.py --export WORKDIR/export [--prompts 1000] [--seeds 0 1] [--only NAME …]

`nextstep-jax demo WORKDIR` trains the model (its export directory is the argument). Every setting samples the same
held-out prompts (`data.shapes.held_out_scenes(prompts, eval_seed)`, the demo's evaluation set) with each seed
(`independent_noise`: every image its own draws) and reports, side by side with the 50-step default (the first,
reference row): head calls per image (`flow.head_evaluations`; rows = calls × CFG branches actually run), seconds per
image (steady state, compile excluded), the demo evaluator's fully-correct rate with its standard error
sqrt(p(1−p)/N) over N = prompts × seeds images, its paired difference to the first row (same prompt and seed
index per image; SE = std(per-image difference)/sqrt(N)), and the Fréchet distance to the ground-truth renders of
the same scenes. Feature map for the Fréchet distance (fixed, no learned network): each image average-pooled to 8×8 RGB in
[0, 1] (192-d) concatenated with a 4×4×4 joint colour histogram (64-d), 256-d in all.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 2)[0])
import benchmarks.common  # noqa: E402,F401  (CPU-only env)

import numpy as np  # noqa: E402

from nextstep_jax.data.shapes import held_out_scenes, render  # noqa: E402
from nextstep_jax.eval.fid import frechet_distance_features  # noqa: E402
from nextstep_jax.eval.shapes_scorer import score_image  # noqa: E402
from nextstep_jax.sampling import flow  # noqa: E402
from nextstep_jax.sampling.pipeline import Options, Sampler  # noqa: E402

DEMO = dict(cfg=3.0, steps=50, method="sde_a", shift=1.0, use_norm=True, positive_prompt=None, negative_prompt="",
            independent_noise=True)  # configs/demo/stage1.py: demo.sample
SETTINGS = {  # name → Options overrides of the demo default
    "default sde_a 50": {},
    "sde_a 25": dict(steps=25),
    "sde_a 12": dict(steps=12),
    "euler 12": dict(method="euler", steps=12),
    "heun 6": dict(method="heun", steps=6),
    "dpm_2m 12": dict(method="dpm_2m", steps=12),
    "dpm_2m 8": dict(method="dpm_2m", steps=8),
    "sde_a 50→25→12→6 (per-token)": dict(step_schedule=(50, 25, 12, 6)),
    "dpm_2m 12→8→6→4 (per-token)": dict(method="dpm_2m", steps=12, step_schedule=(12, 8, 6, 4)),
    "sde_a 12, CFG t ≤ 0.6": dict(steps=12, guidance_times=(0.0, 0.6)),
    "dpm_2m 12, CFG first ½ of tokens": dict(method="dpm_2m", steps=12, guidance_tokens=(0.0, 0.5)),
    "sde_a 50, int8 kernels": dict(quantize="int8"),
}


def features(images_uint8: np.ndarray) -> np.ndarray:
  """(N, 256) fixed features: 8×8 average-pooled RGB and a 4-level-per-channel joint colour histogram."""
  x = images_uint8.astype(np.float64) / 255.0
  n, h, w, _ = x.shape
  pooled = x.reshape(n, 8, h // 8, 8, w // 8, 3).mean(axis=(2, 4)).reshape(n, -1)
  q = np.minimum((x * 4).astype(int), 3)
  bins = (q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).reshape(n, -1)
  hist = np.stack([np.bincount(b, minlength=64) for b in bins]) / bins.shape[1]
  return np.concatenate([pooled, hist], axis=1)


def run_setting(samplers: dict, prompts, opts: Options, quantize: str | None, batch: int, seeds) -> tuple:
  sampler = samplers[quantize]
  images, seconds = [], 0.0
  for seed in seeds:
    for i in range(0, len(prompts), batch):
      res = sampler.text_to_image(prompts[i:i + batch], dataclasses.replace(opts, seed=seed * 100_003 + i))
      images.append(res.images)
      seconds += res.run_s
  return np.concatenate(images), seconds


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--export", required=True, help="the demo's export directory (WORKDIR/export)")
  ap.add_argument("--prompts", type=int, default=1000)
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  ap.add_argument("--eval-seed", type=int, default=1, help="configs/demo/stage1.py demo.eval_seed")
  ap.add_argument("--image-size", type=int, default=32, help="configs/demo/stage1.py IMAGE_SIZE")
  ap.add_argument("--batch", type=int, default=100, help="prompts per call (the last call may be smaller)")
  ap.add_argument("--only", nargs="*", default=None, help="setting names to run (default: all)")
  args = ap.parse_args()
  scenes = held_out_scenes(args.prompts, args.eval_seed)
  prompts = [s.caption for s in scenes]
  truth = features(np.stack([render(s, args.image_size) for s in scenes]))
  samplers = {None: Sampler.from_checkpoint(args.export)}
  names = args.only or list(SETTINGS)
  n_tokens = np.prod(samplers[None].token_grid(args.image_size, args.image_size))
  print(f"{len(prompts)} held-out prompts × seeds {args.seeds} = {len(prompts) * len(args.seeds)} images per row")
  print(f"{'setting':40s} {'head calls':>10s} {'head rows':>10s} {'s/image':>8s} {'fully correct':>16s} "
        f"{'vs first row':>16s} {'FD':>8s}")
  reference = None
  for name in names:
    over = dict(SETTINGS[name])
    quantize = over.pop("quantize", None)
    if quantize not in samplers:
      samplers[quantize] = Sampler.from_checkpoint(args.export, quantize=quantize)
    opts = Options(height=args.image_size, width=args.image_size, **{**DEMO, **over}).validate()
    calls, rows = flow.head_evaluations(opts.flow_config(1.0), int(n_tokens), 2 if opts.cfg > 1 else 1)
    t0 = time.perf_counter()
    images, run_s = run_setting(samplers, prompts, opts, quantize, args.batch, args.seeds)
    correct = np.array([score_image(im, cap)["fully_correct"] for im, cap in zip(images, prompts * len(args.seeds))],
                       dtype=np.float64)
    reference = correct if reference is None else reference
    p = correct.mean()
    se = np.sqrt(p * (1 - p) / len(correct))
    diff = correct - reference
    d_se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    d = diff.mean()
    fd = frechet_distance_features(features(images), truth)
    print(f"{name:40s} {calls:10d} {rows:10d} {run_s / len(images):8.3f} {100 * p:8.1f} ± {100 * se:4.1f} % "
          f"{100 * d:+7.1f} ± {100 * d_se:4.1f} % {fd:8.4f}   (wall {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
