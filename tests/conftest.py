"""Test setup: 8 fake CPU devices, CPU only, and the persistent compilation cache (shared across xdist workers)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

_CACHE = os.environ.get("NEXTSTEP_JAX_TEST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

FIXTURES = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir():
  path = os.path.join(FIXTURES, "nextstep_tiny")
  assert os.path.isdir(path), f"parity fixtures missing at {path}; the repo must sit beside ../shared"
  return path
