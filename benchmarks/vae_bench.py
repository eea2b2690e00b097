"""Flux VAE encode/decode benchmark (real-size config: ch 128, ch_mult [1,2,4,4], 2 res blocks), random weights.

    .venv/bin/python benchmarks/vae_bench.py [--sizes 256 512] [--runs 3] [--dtype float32] [--batch 1]

Reports per image size: compile time (lower + compile, separate from the runs), steady-state time (median of
`--runs` calls, each ended by block_until_ready), XLA's compiled memory analysis (max of peak_memory_in_bytes
and arguments + outputs + temporaries: the program's device-memory bound; "temp" = activations/workspace
alone) and the process's peak RSS so far. Runs on the default backend (CPU here; set JAX_PLATFORMS to choose).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from nextstep_jax.config import VAEConfig, flux_vae
from nextstep_jax.models import flux_vae as fv


def _mib(n: float) -> str:
  return f"{n / 2**20:,.0f}"


def _peak_rss() -> float:
  kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kib * (1 if sys.platform == "darwin" else 1024)


def _bench(fn, args, runs: int) -> dict:
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:  # XLA:CPU leaves peak_memory_in_bytes near the argument size; the sum bounds the peak
    peak = max(getattr(mem, "peak_memory_in_bytes", 0) or 0, mem.argument_size_in_bytes
               + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  dyn = [a for a in args if not isinstance(a, VAEConfig)]
  jax.block_until_ready(compiled(*dyn))  # warm-up
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*dyn))
    times.append(time.perf_counter() - t0)
  return {"compile_s": compile_s, "median_s": statistics.median(times), "min_s": min(times),
          "xla_peak": peak, "temp": mem.temp_size_in_bytes if mem is not None else None, "rss": _peak_rss()}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--dtype", default="float32", help="compute dtype (params stay float32)")
  args = ap.parse_args(argv)

  cfg = VAEConfig(**flux_vae(), dtype=args.dtype).validate()
  params = jax.jit(lambda k: fv.init_params(cfg, k))(jax.random.key(0))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), Flux VAE {n_params / 1e6:.1f}M params, "
        f"batch {args.batch}, dtype {args.dtype}, median of {args.runs} runs")
  rows = []
  for size in args.sizes:
    f = cfg.downsample_factor
    x = jax.random.uniform(jax.random.key(1), (args.batch, size, size, 3), jnp.float32, -1, 1)
    z = jax.random.normal(jax.random.key(2), (args.batch, size // f, size // f, cfg.z_channels), jnp.float32)
    for name, fn, a in (("encode", fv.encode_latents, (params, cfg, x)), ("decode", fv.decode_latents, (params, cfg, z))):
      r = _bench(fn, a, args.runs)
      rows.append((f"{size}²", name, r))
      print(f"  done {size}² {name}", file=sys.stderr, flush=True)
  head = f"{'size':>6} {'op':>7} {'compile s':>10} {'median s':>9} {'min s':>7} {'XLA peak MiB':>13} " \
         f"{'temp MiB':>9} {'max RSS MiB':>12}"
  print(head)
  print("-" * len(head))
  for size, name, r in rows:
    print(f"{size:>6} {name:>7} {r['compile_s']:>10.1f} {r['median_s']:>9.3f} {r['min_s']:>7.3f} "
          f"{_mib(r['xla_peak'] or 0):>13} {_mib(r['temp'] or 0):>9} {_mib(r['rss']):>12}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
