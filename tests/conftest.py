"""Test setup: 8 fake CPU devices, CPU only, and the persistent compilation cache (shared across xdist workers)."""
import contextlib
import os


def cpu_xla_flags(devices: int = 8) -> str:
  """XLA_FLAGS for `devices` fake CPU devices. The concurrency-optimised HLO scheduler is off: with it, XLA:CPU
  (jaxlib 0.10.2) sometimes runs a sharded train step's collectives in different orders on different devices —
  e.g. on mesh (2, 4, 1) devices 0–3 waited in an 8-way all-gather while 4–7 waited in a 4-way one — until the
  40 s rendezvous timeout aborts the process (5 of 11 fresh-process runs; 0 of 13 with the flag)."""
  return f"--xla_force_host_platform_device_count={devices} --xla_cpu_enable_concurrency_optimized_scheduler=false"


os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + cpu_xla_flags()).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402
from xdist_crash_safe import pytest_xdist_make_scheduler  # noqa: E402,F401  (a crashed worker must not hang CI)

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


ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PRODUCTION = Path(ROOT) / "tests" / "fixtures" / "production"  # our official-code references (README there)


@pytest.fixture(scope="session")
def production_model_dir(tmp_path_factory):
  """The production-like release in tests/fixtures/production converted once per worker (read-only for tests)."""
  from nextstep_jax.convert.nextstep import convert_nextstep
  out = tmp_path_factory.mktemp("production") / "model"
  convert_nextstep(PRODUCTION, out)
  return out
DEMO_CI_CONFIG = os.path.join(ROOT, "configs", "demo", "stage1.py") + ":ci"


def subprocess_env(devices: int | None = None, cache: bool = True) -> dict:
  """Environment for a CLI / demo / benchmark subprocess: `devices` fake CPU devices (None: one device; 8 fake
  devices on 2 cores only add overhead) and, with `cache`, this session's persistent compilation cache."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  if devices is not None:
    env["XLA_FLAGS"] = cpu_xla_flags(devices)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if cache:
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir or ""
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


def run_cli(args: list[str], timeout: int) -> str:
  """Runs `python -m <args>` in the repo root; fails the test with the output tail when it exits non-zero."""
  proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=subprocess_env(),
                        cwd=ROOT, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope="session")
def reduced_demo(tmp_path_factory, worker_id):
  """(workdir, stdout) of one finished reduced demo (`configs/demo/stage1.py:ci`), trained once per session and
  shared by the demo and DPO-demo tests. Under xdist the workers share it through the session's base directory
  and a file lock (in case the "demo" group is not kept on one worker): the first trains it, the other
  waits and then reruns the finished demo, which skips every phase. An existing finished workdir can be supplied
  with NEXTSTEP_DEMO_WORKDIR."""
  given = os.environ.get("NEXTSTEP_DEMO_WORKDIR")
  if given:
    return given, ""
  if worker_id == "master":
    workdir, lock = tmp_path_factory.mktemp("reduced_demo"), contextlib.nullcontext()
  else:
    shared = tmp_path_factory.getbasetemp().parent  # this session's directory, above every worker's own
    workdir, lock = shared / "reduced_demo", FileLock(str(shared / "reduced_demo.lock"))
  with lock:
    return str(workdir), run_cli(["nextstep_jax.cli", "demo", "--workdir", str(workdir), "--config",
                                  DEMO_CI_CONFIG], timeout=2400)


def _group_lost_message(detail: str) -> str:
  return (f"--dist loadgroup: {detail}; pytest {pytest.__version__} and pytest-xdist disagree on node ids, so "
          f"xdist_group tests would scatter over workers — install pytest<9.2 (setup.py, constraints.txt)")


def pytest_configure(config):
  """The controller's check (a worker's error below only fails the run; xdist does not show its message)."""
  if config.getoption("dist", "no") == "loadgroup" and not hasattr(pytest.Item, "_nodeid"):
    raise pytest.UsageError(_group_lost_message("pytest.Item has no _nodeid for xdist to rename"))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
  """Under `--dist loadgroup` an `xdist_group` test must carry its group in its node id (xdist adds `@group`),
  or the group's tests scatter over workers: shared fixtures (the reduced demo, the 2-process run) are then built
  twice or waited for. pytest 9.2 ignores xdist 3.8's rename (setup.py pins pytest<9.2)."""
  if not getattr(config.option, "loadgroup", False):
    return
  lost = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
  if lost:
    raise pytest.UsageError(_group_lost_message(f"{len(lost)} xdist_group tests lost their group (e.g. {lost[0]})"))
