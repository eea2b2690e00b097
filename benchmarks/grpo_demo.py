"""NextStep-GRPO on the CPU demo: does on-policy RL with the shapes evaluator as the reward raise the evaluator's
score on held-out prompts, without collapsing diversity, over several training seeds?

  nextstep-jax demo --workdir DEMO [--config configs/demo/stage1.py:ci]          # a trained demo model first
  python -m benchmarks.grpo_demo --demo-workdir DEMO --workdir OUT [--config configs/demo/grpo.py:ci] \
      [--dpo-report DPO_OUT/dpo_demo.json]

Per training seed s of `cfg.demo.grpo.train_seeds`: `train()` with configs/demo/grpo.py from the demo export
(--config.train.seed=s) → OUT/grpo_seed{s}/export. Then the demo export ("before") and every GRPO export ("after")
are evaluated as benchmarks/dpo_demo.py does (its `evaluate`: the demo's sampler, `held_out_prompts(eval_prompts,
cfg.demo.eval_seed)`, one image per prompt and eval seed; diversity). Fully-correct rates are printed with their
standard error over prompts × eval seeds; a DPO report of the same prompts (`--dpo-report`) is printed alongside.
Results: OUT/grpo_demo.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from benchmarks.dpo_demo import evaluate

from nextstep_jax.config import load_config
from nextstep_jax.data.shapes import held_out_prompts
from nextstep_jax.train.loop import train
from nextstep_jax.train.metrics import read_history

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "configs" / "demo" / "grpo.py")
KEYS = ("fully_correct", "attribute_score", "color", "kind", "count", "objects", "position", "pixel_distance",
        "distinct_layouts")


def _overrides(demo: Path) -> list[str]:
  return [f"--config.data.tokenizer={demo / 'vae' / 'tokenizer'}", f"--config.train.vae_from={demo / 'vae'}",
          f"--config.train.init_from={demo / 'train' / 'export'}"]


def standard_error(p: float, n: int) -> float:
  return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def run(demo_workdir, workdir, config: str = DEFAULT_CONFIG, overrides: list[str] | None = None,
        dpo_report: str | None = None) -> dict:
  demo, out = Path(demo_workdir).resolve(), Path(workdir).resolve()
  export = demo / "train" / "export"
  if not (export / "params").is_dir():
    raise SystemExit(f"{export} has no trained model; run `nextstep-jax demo --workdir {demo}` first")
  cfg = load_config(config, [*(overrides or []), *_overrides(demo)])
  e = cfg.demo.grpo
  out.mkdir(parents=True, exist_ok=True)
  prompts = held_out_prompts(e.eval_prompts, cfg.demo.eval_seed)
  n = len(prompts) * len(e.eval_seeds)
  t0 = time.perf_counter()
  report = {"before": evaluate(export, cfg, prompts, e), "after": {}, "train": {}, "eval_prompts": len(prompts),
            "eval_seeds": list(e.eval_seeds), "settings": {"grpo": cfg.grpo.to_dict(), "lr": cfg.train.lr,
                                                           "steps": cfg.train.steps,
                                                           "rollouts_per_step": cfg.data.global_batch_size}}
  timings = {"eval_before_s": time.perf_counter() - t0}
  for seed in e.train_seeds:
    run_cfg = load_config(config, [*(overrides or []), *_overrides(demo), f"--config.train.seed={int(seed)}"])
    t0 = time.perf_counter()
    train(run_cfg, str(out / f"grpo_seed{seed}"))
    timings[f"grpo_seed{seed}_s"] = time.perf_counter() - t0
    hist = read_history(out / f"grpo_seed{seed}")
    report["train"][str(seed)] = {"first": hist[0] if hist else {}, "last": hist[-1] if hist else {}}
    t0 = time.perf_counter()
    report["after"][str(seed)] = evaluate(out / f"grpo_seed{seed}" / "export", cfg, prompts, e)
    timings[f"eval_seed{seed}_s"] = time.perf_counter() - t0
  report["timings"] = timings
  dpo = json.loads(Path(dpo_report).read_text())["after"] if dpo_report else None
  (out / "grpo_demo.json").write_text(json.dumps(dict(report, dpo_after=dpo), indent=2, default=list))
  cols = ["before"] + [f"grpo s{s}" for s in e.train_seeds] + (["dpo"] if dpo else [])
  print(f"[grpo_demo] {len(prompts)} held-out prompts × {len(e.eval_seeds)} seeds (n = {n}); "
        f"{cfg.train.steps} GRPO steps × {cfg.data.global_batch_size} rollouts")
  print(f"[grpo_demo] {'metric':<20}" + "".join(f"{c:>16}" for c in cols))
  for k in KEYS:
    vals = [report["before"][k]] + [report["after"][str(s)][k] for s in e.train_seeds] + ([dpo[k]] if dpo else [])
    se = k == "fully_correct"
    print(f"[grpo_demo] {k:<20}" + "".join(f"{v:>9.3f}" + (f" ±{standard_error(v, n):.3f}" if se else " " * 7)
                                           for v in vals))
  print(f"[grpo_demo] timings {', '.join(f'{k} {v:.0f}' for k, v in timings.items())}", flush=True)
  return report


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--demo-workdir", required=True, help="a finished `nextstep-jax demo` workdir")
  p.add_argument("--workdir", required=True, help="outputs: grpo_seed*/, grpo_demo.json")
  p.add_argument("--config", default=DEFAULT_CONFIG, help="GRPO config (':ci' for the reduced demo)")
  p.add_argument("--dpo-report", default=None, help="a benchmarks/dpo_demo.py report on the same prompts")
  args, rest = p.parse_known_args(argv)
  run(args.demo_workdir, args.workdir, args.config, [a for a in rest if a.startswith("--config.")], args.dpo_report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
