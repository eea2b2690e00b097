"""`nextstep-jax demo --workdir DIR [--config configs/demo/stage1.py[:ci]] [--config.x=y ...]`.

Trains a small NextStep end to end on the CPU (shapes dataset → VAE → latent cache → `train` → samples →
evaluator → DIR/report.md); see nextstep_jax/demo/run.py. Run it again to resume: finished phases are skipped.
"""
from __future__ import annotations

import argparse

from nextstep_jax.demo import DEFAULT_CONFIG


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("demo", help="train a small NextStep on the CPU end to end, sample and score it (resumable)")
  p.add_argument("--workdir", required=True, help="all outputs (dataset, VAE, checkpoints, samples, report.md)")
  p.add_argument("--config", default=DEFAULT_CONFIG,
                 help="demo experiment file; append ':ci' for the reduced (test-sized) demo")
  p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
  p.set_defaults(func=run)


def run(args) -> int:
  from nextstep_jax.demo.run import run_demo
  run_demo(args.workdir, args.config, args.config_overrides)
  return 0
