"""`nextstep-jax aot --config C --topology v5p-256 [--num-slices N] [--program train|sample|serve] [--json]`.

Compiles the real train step (or generation program) of config C for a TPU pod on this machine and reports
per-chip peak memory vs usable HBM, the fit verdict, compile time, analytic FLOPs and step times at 40/50/60% MFU.
Exit codes: 0 fits, 3 does not fit (one line with what to change), 2 any other error (one line).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from nextstep_jax.commands.arg_types import COUNT, NON_NEGATIVE_INT


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("aot", help="compile a config for a TPU pod here (XLA:TPU, no TPU needed): does it fit?")
  p.add_argument("--config", required=True, help="experiment file, e.g. configs/nextstep1_14b/stage1_256px.py")
  p.add_argument("--topology", required=True, help="pod type, e.g. v5p-128, v5p-256, v5e-256, v6e-256, v4-64")
  p.add_argument("--num-slices", type=COUNT, default=1,
                 help="multislice: slices joined over DCN (set config.mesh.dcn_*)")
  p.add_argument("--program", choices=("train", "sample", "serve"), default="train",
                 help="train: the train step; sample: prefill + token loop + VAE decode; serve: the serving "
                 "engine's step (without --sample-batch: how many slots fit in HBM)")
  p.add_argument("--json", action="store_true", help="print one JSON object (also for errors)")
  g = p.add_argument_group("sample program")
  g.add_argument("--sample-batch", type=NON_NEGATIVE_INT, default=0,
                 help="images per call (default: one per data-parallel group)")
  g.add_argument("--sample-steps", type=COUNT, default=50, help="flow-sampler steps per image token")
  g.add_argument("--sample-prompt-len", type=COUNT, default=256, help="prompt length bucket")
  g.add_argument("--sample-resolution", type=NON_NEGATIVE_INT, default=0,
                 help="image side in pixels (default: config.data.resolution)")
  g.add_argument("--sample-edit", action="store_true", help="editing program (3 CFG branches + a source image)")
  g.add_argument("--sample-quantize", default="", choices=("", "int8"),
                 help="int8: the backbone's dense kernels int8 with per-channel scales (`sample --quantize int8`)")
  g.add_argument("--serve-verify", action="store_true", help="serve: also compile the slot count that fits")
  p.add_argument("--debug", action="store_true", help="raise errors with tracebacks instead of one line")
  p.set_defaults(func=run)


def run(args) -> int:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices need no TPU; keep jax off accelerators
  from nextstep_jax import aot
  from nextstep_jax.config import load_config
  from nextstep_jax.errors import native_stderr_hidden
  from nextstep_jax.serving.aot import slots_that_fit
  settings = aot.SampleSettings(images=args.sample_batch, steps=args.sample_steps, prompt_len=args.sample_prompt_len,
                                resolution=args.sample_resolution, edit=args.sample_edit,
                                quantize=args.sample_quantize)
  header = dict(config=args.config, pod=args.topology, num_slices=args.num_slices, program=args.program)
  try:
    config = load_config(args.config, args.config_overrides)
    with native_stderr_hidden(not getattr(args, "verbose", False)):  # libtpu's start-up lines on a CPU machine
      if args.program == "serve" and not args.sample_batch:
        fit = slots_that_fit(config, args.topology, settings, verify=args.serve_verify)
        print(json.dumps(dict(header, ok=True, **vars(fit))) if args.json else fit.line())
        return 0
      result = aot.compile_for_pod(config, args.topology, args.num_slices, args.program, settings)
  except Exception as e:
    if args.debug:
      raise
    code = getattr(e, "exit_code", aot.EXIT_ERROR)
    message = str(e) if isinstance(e, (aot.AotError, ValueError)) else aot.one_line(e)
    message = " ".join(message.split())
    if args.json:
      extra = {}
      if isinstance(e, aot.DoesNotFit):
        extra = dict(fits=False, needed_gib=e.needed_bytes / aot.GIB if e.needed_bytes else None,
                     hbm_gib=e.available_bytes / aot.GIB)
      print(json.dumps(dict(header, ok=False, exit_code=code, error=message, **extra)))
    else:
      print(f"nextstep-jax aot: {message}", file=sys.stderr)
    return code
  if args.json:
    print(json.dumps(dict(header, **result.to_json()), default=str))
  else:
    print(f"{args.config}\n{result.summary()}")
  return 0
