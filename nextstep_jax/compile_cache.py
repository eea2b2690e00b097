"""JAX's persistent compilation cache, on by default for `sample` and other long-running commands: a second call
at the same shapes loads the compiled program instead of recompiling. The directory is, in order: one already
configured (`JAX_COMPILATION_CACHE_DIR` / jax.config), `$NEXTSTEP_JAX_CACHE`, `~/.cache/nextstep_jax/xla`."""
from __future__ import annotations

import os
from pathlib import Path

import jax

DEFAULT_DIR = Path("~/.cache/nextstep_jax/xla")


def enable(directory: str | os.PathLike | None = None, min_compile_s: float = 1.0) -> str:
  """Turns the cache on (keeping a directory that is already configured) and returns its path. Programs that
  compile faster than `min_compile_s` are not written."""
  current = jax.config.jax_compilation_cache_dir
  if not current:
    current = str(Path(directory or os.environ.get("NEXTSTEP_JAX_CACHE") or DEFAULT_DIR).expanduser())
    jax.config.update("jax_compilation_cache_dir", current)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
  return current
