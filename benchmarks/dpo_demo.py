"""DPO on the CPU demo: does preference alignment on the demo's own samples, ranked by the shapes evaluator, raise
the evaluator's score on held-out prompts without collapsing sample diversity?

  nextstep-jax demo --workdir DEMO [--config configs/demo/stage1.py:ci]          # a trained demo model first
  python -m benchmarks.dpo_demo --demo-workdir DEMO --workdir OUT [--config configs/demo/dpo.py:ci]

Phases (each skipped when its output exists): 1 pairs — `cfg.demo.dpo.pair_prompts` training-distribution prompts,
K samples each with the demo's sampler, best vs worst by `shapes_score` (fraction of the evaluator's verdicts that
hold) when they differ by ≥ margin → OUT/prefs, and the same from `heldout_pair_prompts` new draws → OUT/prefs_heldout;
2 DPO — `train()` with configs/demo/dpo.py (policy and reference = the demo export) → OUT/dpo/export, then the DPO
reward accuracy on the held-out pairs (the trained policy against the demo reference, one frozen pass: lr 0) →
OUT/dpo_heldout; 3 evaluation of the demo export ("before") and the DPO export ("after") on
the demo's held-out prompts (`held_out_prompts(eval_prompts, eval_seed)`, one image per prompt and eval seed):
evaluator accuracies and the mean attribute score; diversity on the first `diversity_prompts` prompts with
`diversity_seeds` samples each: mean pairwise pixel distance (mean |a − b| / 255) and distinct layouts (detections
quantised to (colour, kind, 4×4 cell)). Results: OUT/dpo_demo.json (and printed).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from nextstep_jax.apps import preference_pairs as pp
from nextstep_jax.apps.preference_pairs import shapes_score
from nextstep_jax.config import load_config
from nextstep_jax.data.shapes import held_out_prompts
from nextstep_jax.demo.run import sampling_options
from nextstep_jax.eval.shapes_scorer import detect, score_batch
from nextstep_jax.paths import CONFIGS_DIR
from nextstep_jax.sampling.pipeline import Sampler
from nextstep_jax.train.loop import train
from nextstep_jax.train.metrics import read_history

os.environ.setdefault("JAX_PLATFORMS", "cpu")
DEFAULT_CONFIG = str(CONFIGS_DIR / "demo" / "dpo.py")
HELDOUT_SEED_OFFSET = 1000  # held-out pair prompts: new draws of the training distribution


def _overrides(demo: Path, prefs: Path) -> list[str]:
  source = json.dumps({"name": "prefs", "path": str(prefs), "weight": 1.0, "kind": ""})
  return [f"--config.data.sources=[{source}]", f"--config.data.tokenizer={demo / 'vae' / 'tokenizer'}",
          f"--config.train.vae_from={demo / 'vae'}", f"--config.train.init_from={demo / 'train' / 'export'}"]


def layout_key(image: np.ndarray) -> tuple:
  """What an image shows, coarsely: sorted (colour, kind, column, row) of its detections on a 4×4 grid."""
  return tuple(sorted((d.color, d.kind, min(int(d.cx * 4), 3), min(int(d.cy * 4), 3)) for d in detect(image)))


def diversity(images: np.ndarray, per_prompt: int) -> dict:
  """Mean pairwise pixel distance and distinct layouts among each prompt's `per_prompt` consecutive images."""
  dist, layouts = [], []
  for start in range(0, len(images), per_prompt):
    group = images[start:start + per_prompt].astype(np.float32) / 255.0
    dist += [float(np.abs(a - b).mean()) for a, b in itertools.combinations(group, 2)]
    layouts.append(len({layout_key(im) for im in images[start:start + per_prompt]}))
  return {"pixel_distance": float(np.mean(dist)), "distinct_layouts": float(np.mean(layouts))}


def evaluate(model_dir: Path, cfg, prompts: list[str], settings=None) -> dict:
  """Evaluator accuracies (averaged over the eval seeds), mean attribute score, diversity; `settings` (eval_seeds,
  diversity_prompts, diversity_seeds) default to `cfg.demo.dpo`."""
  e = settings or cfg.demo.dpo
  sampler = Sampler.from_checkpoint(model_dir)
  base = sampling_options(cfg)
  runs, attr = [], []
  for seed in e.eval_seeds:
    images = sampler.text_to_image(prompts, dataclasses.replace(base, seed=int(seed))).images
    runs.append(score_batch(images, prompts))
    attr += [shapes_score(im, p) for im, p in zip(images, prompts)]
  out = {k: float(np.mean([r[k] for r in runs])) for k in ("fully_correct", "color", "kind", "count", "objects",
                                                           "position", "fully_correct_single", "fully_correct_two")}
  out["attribute_score"] = float(np.mean(attr))
  few = prompts[:e.diversity_prompts]
  images = sampler.text_to_image(few, dataclasses.replace(base, num_images_per_prompt=e.diversity_seeds)).images
  out.update(diversity(images, e.diversity_seeds))
  return out


def heldout_accuracy(config: str, overrides: list[str] | None, demo: Path, out: Path, prefs: Path,
                     num_pairs: int) -> dict:
  """DPO reward accuracy and margin of the trained policy (OUT/dpo/export) against the demo reference on pairs
  DPO never trained on: one pass of the DPO step with lr 0 (the params stay frozen), averaged over its steps."""
  cfg = load_config(config, [*(overrides or []), *_overrides(demo, prefs)])
  steps = max(1, -(-num_pairs // cfg.data.global_batch_size))
  t = cfg.train
  t.init_from, t.steps, t.lr, t.end_lr, t.warmup_steps = str(out / "dpo" / "export"), steps, 0.0, 0.0, 0
  t.log_every, t.save_every = 1, steps
  cfg.dpo.ref_from = str(demo / "train" / "export")
  train(cfg, str(out / "dpo_heldout"))
  rows = read_history(out / "dpo_heldout")
  acc = [r["reward_accuracy"] for r in rows]
  return {"reward_accuracy": float(np.mean(acc)), "reward_margin": float(np.mean([r["reward_margin"] for r in rows])),
          "reward_accuracy_se": float(np.sqrt(np.mean(acc) * (1 - np.mean(acc)) / max(num_pairs, 1))),
          "pairs": num_pairs, "steps": steps}


def run(demo_workdir: str | os.PathLike, workdir: str | os.PathLike, config: str = DEFAULT_CONFIG,
        overrides: list[str] | None = None) -> dict:
  demo, out = Path(demo_workdir).resolve(), Path(workdir).resolve()
  export = demo / "train" / "export"
  if not (export / "params").is_dir():
    raise SystemExit(f"{export} has no trained model; run `nextstep-jax demo --workdir {demo}` first")
  prefs = out / "prefs"
  cfg = load_config(config, [*(overrides or []), *_overrides(demo, prefs)])
  e, timings = cfg.demo.dpo, {}
  out.mkdir(parents=True, exist_ok=True)

  def pairs(n_prompts: int, seed: int, dst: Path) -> dict:
    counts_path = dst.with_name(dst.name + "_counts.json")
    if not counts_path.is_file():
      settings = pp.PairSettings(k=e.k, margin=e.margin, prompts_per_call=e.prompts_per_call)
      _, counts = pp.make_prefs_from_model(export, pp.shapes_prompts(n_prompts, seed), dst, pp.shapes_score,
                                           sampling_options(cfg), settings, overwrite=True)
      counts_path.write_text(json.dumps(counts))
    return json.loads(counts_path.read_text())

  t0 = time.perf_counter()
  counts = pairs(e.pair_prompts, e.prompt_seed, prefs)
  heldout_prefs = out / "prefs_heldout"
  heldout_counts = pairs(e.heldout_pair_prompts, e.prompt_seed + HELDOUT_SEED_OFFSET, heldout_prefs)
  timings["pairs_s"] = time.perf_counter() - t0
  print(f"[dpo_demo] {counts['pairs']} pairs from {counts['prompts']} prompts; mean score of the samples "
        f"{counts['score_mean'] / counts['prompts']:.3f}, chosen {counts['score_best'] / counts['pairs']:.3f}, "
        f"rejected {counts['score_worst'] / counts['pairs']:.3f}", flush=True)

  t0 = time.perf_counter()
  result = train(cfg, str(out / "dpo"))
  timings["dpo_s"] = time.perf_counter() - t0
  hist = read_history(out / "dpo")
  heldout = heldout_accuracy(config, overrides, demo, out, heldout_prefs, heldout_counts["pairs"])

  t0 = time.perf_counter()
  prompts = held_out_prompts(e.eval_prompts or cfg.demo.eval_prompts, cfg.demo.eval_seed)
  before, after = evaluate(export, cfg, prompts), evaluate(out / "dpo" / "export", cfg, prompts)
  timings["eval_s"] = time.perf_counter() - t0
  report = {"pairs": counts, "heldout_pairs": heldout_counts, "heldout": heldout, "before": before, "after": after, "timings": timings, "steps": result.step,
            "dpo_first": hist[0] if hist else {}, "dpo_last": hist[-1] if hist else {},
            "settings": {"dpo": cfg.dpo.to_dict(), "lr": cfg.train.lr, "steps": cfg.train.steps,
                         "pairs_per_batch": cfg.data.global_batch_size, "pair_making": e.to_dict(),
                         "eval_prompts": len(prompts)}}
  (out / "dpo_demo.json").write_text(json.dumps(report, indent=2, default=list))
  print(f"[dpo_demo] {'metric':<22}{'before':>9}{'after':>9}")
  for k in ("fully_correct", "attribute_score", "color", "kind", "count", "objects", "position", "pixel_distance",
            "distinct_layouts"):
    print(f"[dpo_demo] {k:<22}{before[k]:>9.3f}{after[k]:>9.3f}")
  last = report["dpo_last"]
  print(f"[dpo_demo] DPO step {result.step}: loss {last.get('dpo_loss', float('nan')):.3f}, reward accuracy "
        f"{last.get('reward_accuracy', float('nan')):.2f}, margin {last.get('reward_margin', float('nan')):.3f}; "
        f"timings {', '.join(f'{k} {v:.0f}' for k, v in timings.items())}", flush=True)
  print(f"[dpo_demo] held-out pairs ({heldout_counts['pairs']}): reward accuracy {heldout['reward_accuracy']:.3f} "
        f"± {heldout['reward_accuracy_se']:.3f}, margin {heldout['reward_margin']:.3f}", flush=True)
  return report


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--demo-workdir", required=True, help="a finished `nextstep-jax demo` workdir")
  p.add_argument("--workdir", required=True, help="outputs: prefs/, dpo/, dpo_demo.json")
  p.add_argument("--config", default=DEFAULT_CONFIG, help="DPO config (':ci' for the reduced demo)")
  args, rest = p.parse_known_args(argv)
  run(args.demo_workdir, args.workdir, args.config, [a for a in rest if a.startswith("--config.")])
  return 0


if __name__ == "__main__":
  sys.exit(main())
