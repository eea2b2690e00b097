"""Shared helpers for benchmark scripts: CPU-only env, timing (compile vs steady state), RSS."""
from __future__ import annotations

import os
import resource
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def timed(fn, *args, repeats: int = 5):
  """(first-call seconds incl. compile, median steady-state seconds, last output); blocks on results."""
  import jax
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times), out


def peak_rss_mb(children: bool = False) -> float:
  who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
  return resource.getrusage(who).ru_maxrss / 1024.0
