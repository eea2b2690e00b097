"""`nextstep-jax serve --checkpoint DIR --slots N --size 512x512 --port 8000`: the OpenAI-compatible image server.

Loads the model, builds a text-to-image engine of N slots (and an editing engine with --edit-slots), compiles
every program (persistent compilation cache: a restart loads them), then opens the port. SIGTERM stops
accepting, finishes the requests in flight and exits 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from nextstep_jax.commands.arg_types import image_size


def register(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser("serve", help="serve text-to-image (and editing) over an OpenAI-compatible HTTP API")
  p.add_argument("--checkpoint", required=True, help="model directory (convert --dst or a training export)")
  p.add_argument("--slots", type=int, default=4, help="text-to-image decode slots (images generated together)")
  p.add_argument("--edit-slots", type=int, default=0, help="editing slots (0: /v1/images/edits is refused)")
  p.add_argument("--size", default="512x512", help="HEIGHTxWIDTH of every image served, multiples of 16")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--steps", type=int, default=50, help="flow-sampler steps per image token (fixed per server)")
  p.add_argument("--sampler", default="sde_a", choices=("sde_a", "sde_b", "euler", "heun"))
  p.add_argument("--shift", type=float, default=None, help="timestep shift (default 1.0; 3.2 for editing)")
  p.add_argument("--cfg-schedule", default="constant", choices=("constant", "linear", "linear_rise"))
  p.add_argument("--prompt-buckets", default="32,64,128,256", help="prompt length buckets (tokens, comma list)")
  p.add_argument("--positive-prompt", default=None, help="appended to captions (default: the official one)")
  p.add_argument("--negative-prompt", default=None, help="default negative prompt (default: the official one)")
  p.add_argument("--max-queue", type=int, default=64, help="images waiting for a slot before 429")
  p.add_argument("--max-n", type=int, default=4, help="largest n per request")
  p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request gets 504")
  p.add_argument("--dtype", default=None, help="compute dtype override (float32 is fastest on CPU)")
  p.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes to shard over devices, e.g. 8,1,1")
  p.add_argument("--compile-cache", default=None, help="persistent compilation cache directory (default: "
                 "$JAX_COMPILATION_CACHE_DIR or ~/.cache/nextstep_jax/xla)")
  p.set_defaults(func=run)


def _buckets(text: str) -> tuple[int, ...]:
  try:
    out = tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    out = ()
  if not out or min(out) < 1:
    raise ValueError(f"--prompt-buckets {text!r} must be positive integers, e.g. 32,64,128")
  return out


def run(args) -> int:
  h, w = image_size(args.size)
  for name in ("slots", "max_queue", "max_n"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be ≥ 1")
  if args.max_n > args.max_queue:
    raise ValueError(f"--max-n {args.max_n} exceeds --max-queue {args.max_queue}: such requests could never queue")
  if not 0 < args.port < 65536:
    raise ValueError(f"--port {args.port} must be in 1..65535")
  if not Path(args.checkpoint).is_dir():
    raise FileNotFoundError(f"--checkpoint {args.checkpoint} is not a directory")
  buckets = _buckets(args.prompt_buckets)

  import jax
  cache = args.compile_cache or os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
      Path.home() / ".cache" / "nextstep_jax" / "xla")
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(cache))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

  import uvicorn
  from nextstep_jax import sharding
  from nextstep_jax.sampling.pipeline import T2I_POSITIVE, Sampler
  from nextstep_jax.serving.engine import Engine, EngineConfig
  from nextstep_jax.serving.metrics import ServingMetrics
  from nextstep_jax.serving.payloads import Limits
  from nextstep_jax.serving.scheduler import Scheduler
  from nextstep_jax.serving.server import build_app

  t0 = time.perf_counter()
  mesh = sharding.mesh_from_shape(tuple(int(x) for x in args.mesh.split(","))) if args.mesh else None
  print(f"loading {args.checkpoint} …", file=sys.stderr, flush=True)
  sampler = Sampler.from_checkpoint(args.checkpoint, mesh=mesh, compute_dtype=args.dtype)
  common = dict(height=h, width=w, steps=args.steps, method=args.sampler, shift=args.shift,
                cfg_schedule=args.cfg_schedule, prompt_buckets=buckets,
                positive_prompt=T2I_POSITIVE if args.positive_prompt is None else args.positive_prompt,
                negative_prompt=args.negative_prompt)
  engines = {"t2i": Engine.from_sampler(sampler, EngineConfig(slots=args.slots, mode="t2i", **common))}
  if args.edit_slots > 0:
    engines["edit"] = Engine.from_sampler(sampler, EngineConfig(slots=args.edit_slots, mode="edit", **common))
  for mode, engine in engines.items():
    engine.warm_up()
  print(f"warm-up: every program compiled in {time.perf_counter() - t0:.1f} s (cache {cache})", file=sys.stderr,
        flush=True)

  metrics = ServingMetrics(sum(e.config.slots for e in engines.values()))
  scheduler = Scheduler(engines, args.max_queue, metrics).start()
  app = build_app(scheduler, Limits(width=w, height=h, steps=args.steps, max_n=args.max_n), args.request_timeout,
                  metrics)
  server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                         access_log=False, lifespan="off"))
  # uvicorn re-raises the signal it shut down on once it has restored the previous handlers: make those no-ops
  # so the drain below runs and the process exits 0
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: None)
  slots = ", ".join(f"{m}: {e.config.slots} slots" for m, e in engines.items())
  print(f"serving on http://{args.host}:{args.port} ({slots}, {w}x{h}, {args.steps} steps)", file=sys.stderr,
        flush=True)
  server.run()
  print("stopping: draining the scheduler …", file=sys.stderr, flush=True)
  scheduler.stop()
  return 0 if scheduler.error is None else 1
