"""`nextstep-jax sample --checkpoint DIR --prompt "..." [--image in.png] --size 512x512 --out out.png`."""
from __future__ import annotations

import argparse
import sys

from nextstep_jax.commands.arg_types import COUNT, GUIDANCE, NON_NEGATIVE_INT, POSITIVE, image_size
from nextstep_jax.sampling.methods import METHODS


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("sample", help="generate (or edit) images with a converted or trained model directory")
  p.add_argument("--checkpoint", required=True, help="model directory (convert --dst or a training WORKDIR/export)")
  p.add_argument("--prompt", required=True, action="append", help="caption (repeat for a batch); for editing it "
                 "must contain one <image> tag")
  p.add_argument("--image", default=None, help="source image for editing")
  p.add_argument("--size", default="512x512", help="HEIGHTxWIDTH, multiples of 16 (e.g. 256x512)")
  p.add_argument("--cfg", type=GUIDANCE, default=7.5, help="guidance scale (≥ 1; 1 disables CFG)")
  p.add_argument("--cfg-img", type=GUIDANCE, default=2.0, help="image guidance (editing)")
  p.add_argument("--cfg-schedule", default="constant", choices=("constant", "linear", "linear_rise"))
  p.add_argument("--steps", type=COUNT, default=50)
  p.add_argument("--shift", type=POSITIVE, default=None, help="timestep shift (default 1.0; 3.2 for editing)")
  p.add_argument("--sampler", default="sde_a", choices=METHODS,
                 help="sde_a = the official release sampler; dpm_2m = DPM-Solver++(2M) on its log-SNR grid; "
                      "flow_sde / cps = the log-prob SDEs of GRPO rollouts (see --noise-level)")
  p.add_argument("--noise-level", type=POSITIVE, default=0.7,
                 help="flow_sde / cps only: the SDE noise level a (cps: 0 < a <= 1)")
  p.add_argument("--step-schedule", default=None, help="per-token flow steps over equal token segments, e.g. "
                 "50,25,10 (each ≤ --steps)")
  p.add_argument("--guidance-times", default=None, help="LO,HI: CFG only at flow times in [LO, HI] (e.g. 0,0.6)")
  p.add_argument("--guidance-tokens", default=None, help="LO,HI: CFG only for tokens k/n in [LO, HI)")
  p.add_argument("--quantize", default=None, choices=("int8",), help="int8 decoder kernels (stored by convert "
                 "--quantize int8, else quantized on load)")
  p.add_argument("--no-compile-cache", action="store_true", help="do not use the persistent compilation cache")
  p.add_argument("--progress", action="store_true", help="per-token progress bar (its host callback keeps JAX "
                 "from writing the program to the compilation cache)")
  p.add_argument("--no-norm", action="store_true", help="disable use_norm token re-normalisation")
  p.add_argument("--positive-prompt", default=None, help="appended to text-to-image captions (default: official)")
  p.add_argument("--negative-prompt", default=None)
  p.add_argument("--num-images", type=COUNT, default=1, help="images per prompt")
  p.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
  p.add_argument("--dtype", default=None, help="compute dtype override (float32 is fastest on CPU)")
  p.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes to shard over devices, e.g. 1,4,2")
  p.add_argument("--out", default="out.png", help="PNG path; several images get _<i> suffixes")
  p.set_defaults(func=run)


def _floats(flag: str, text: str | None, n: int | None, kind=float):
  if text is None:
    return None
  try:
    values = tuple(kind(x) for x in text.split(","))
  except ValueError:
    raise ValueError(f"{flag} {text!r} must be comma-separated numbers, e.g. {'50,25,10' if kind is int else '0,0.6'}"
                     ) from None
  if n is not None and len(values) != n:
    raise ValueError(f"{flag} {text!r} needs exactly {n} comma-separated values (LO,HI)")
  return values


def run(args) -> int:
  from pathlib import Path

  from nextstep_jax import compile_cache, sharding
  from nextstep_jax.images import load_image, save_png
  from nextstep_jax.sampling.pipeline import T2I_POSITIVE, Options, Sampler

  if not args.no_compile_cache:  # before anything compiles: JAX reads the setting at its first compilation
    compile_cache.enable()
  h, w = image_size(args.size)
  mesh = sharding.mesh_from_shape(tuple(int(x) for x in args.mesh.split(","))) if args.mesh else None
  print(f"loading {args.checkpoint} …", file=sys.stderr, flush=True)
  schedule = _floats("--step-schedule", args.step_schedule, None, int) or ()
  windows = {name: _floats(f"--{name.replace('_', '-')}", getattr(args, name), 2) or (0.0, 1.0)
             for name in ("guidance_times", "guidance_tokens")}
  opts = Options(height=h, width=w, cfg=args.cfg, cfg_img=args.cfg_img, cfg_schedule=args.cfg_schedule,
                 steps=args.steps, shift=args.shift, method=args.sampler, use_norm=not args.no_norm,
                 positive_prompt=T2I_POSITIVE if args.positive_prompt is None else args.positive_prompt,
                 negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images, seed=args.seed,
                 progress=args.progress, step_schedule=schedule, noise_level=args.noise_level,
                 **windows).validate()
  sampler = Sampler.from_checkpoint(args.checkpoint, mesh=mesh, compute_dtype=args.dtype, quantize=args.quantize)
  if args.image is None and any("<image>" in p for p in args.prompt):
    raise ValueError("the prompt contains <image> (editing) but no --image was given; pass --image in.png")
  if args.image is not None:
    if len(args.prompt) != 1:
      raise ValueError("editing takes exactly one --prompt")
    result = sampler.edit(args.prompt[0], load_image(args.image), opts)
  else:
    result = sampler.text_to_image(args.prompt, opts)
  n = len(result.images)
  tokens = result.tokens.shape[1] * n
  print(f"compile {result.compile_s:.1f} s; generate {result.run_s:.2f} s for {n} image(s) "
        f"({tokens / result.run_s:.1f} image tokens/s incl. VAE decode)", flush=True)
  out = Path(args.out)
  for i, img in enumerate(result.images):
    path = out if n == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
    save_png(path, img)
    print(f"wrote {path}")
  return 0
