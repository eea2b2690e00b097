"""`nextstep-jax lora merge --src ADAPTERS_DIR --dst MODEL_DIR [--model BASE_DIR]`: adapters → merged model."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("lora", help="LoRA adapters: merge an adapters-only directory into a model directory")
  kinds = p.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
  m = kinds.add_parser("merge", help="adapters (a LoRA run's WORKDIR/export_adapters) + base → params-only model dir "
                                     "that sample/serve/convert export-nextstep read")
  m.add_argument("--src", required=True, help="adapters directory (WORKDIR/export_adapters)")
  m.add_argument("--dst", required=True, help="merged model directory to write")
  m.add_argument("--model", default=None, help="base model directory (default: the one the adapters record)")
  m.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
  m.set_defaults(func=run)


def run(args) -> int:
  from nextstep_jax.train.lora import merge_adapter_dir  # lazy: `--help` must not import jax
  out = merge_adapter_dir(args.src, args.dst, args.model, args.overwrite)
  print(f"merged model written to {out}", flush=True)
  return 0
