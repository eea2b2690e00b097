"""`nextstep-jax train --config configs/....py --workdir DIR [--config.x=y ...] [--multihost]`."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser(
      "train", help="train one curriculum stage (resumes automatically from --workdir)",
      description="Train one stage of a config. To fine-tune a released model, convert it first and start from "
                  "the conversion: `nextstep-jax convert nextstep --src NextStep-1-Large --dst ckpt/large "
                  "--dtype bfloat16`, then `--config.train.init_from=ckpt/large` (full fine-tuning: "
                  "configs/nextstep1_14b/sft.py; LoRA/QLoRA adapters on a frozen base: lora_sft.py / lora_edit.py, "
                  "whose checkpoints hold the adapters only and whose WORKDIR/export is the merged model).")
  p.add_argument("--config", required=True, help="experiment file, e.g. configs/nextstep1_14b/stage1_256px.py")
  p.add_argument("--workdir", required=True, help="checkpoints, metrics, TensorBoard, export (local or gs://)")
  p.add_argument("--multihost", action="store_true",
                 help="call jax.distributed.initialize() (TPU pods auto-detect; else see --coordinator)")
  p.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-process without TPU metadata)")
  p.add_argument("--num-processes", type=int, default=None)
  p.add_argument("--process-id", type=int, default=None)
  p.add_argument("--max-steps", type=int, default=None, help="stop after this step (keeps the schedule)")
  p.set_defaults(func=run)


def init_distributed(args) -> None:
  import jax
  if args.coordinator or args.multihost:
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
    print(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} global "
          f"devices ({jax.local_device_count()} local)", flush=True)


EXIT_DIVERGED = 4


def run(args) -> int:
  init_distributed(args)
  from nextstep_jax.config import load_config  # lazy: `nextstep-jax --help` must not import jax
  from nextstep_jax.train.loop import train
  from nextstep_jax.train.stops import TrainingDiverged
  config = load_config(args.config, args.config_overrides)
  try:
    result = train(config, args.workdir, max_steps=args.max_steps)
  except TrainingDiverged as e:
    print(f"nextstep-jax train: error: {e}", flush=True)
    return EXIT_DIVERGED
  print(f"{'preempted at' if result.preempted else 'finished at'} step {result.step}", flush=True)
  return 0
