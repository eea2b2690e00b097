"""Kill/resume soak: SIGKILL a tiny training run at a random moment (often mid-save), resume it to the end, and
check that its params and loss history are bit-identical to an uninterrupted run.

  nice -n 10 python benchmarks/kill_resume_soak.py --trials 20

Each trial: start `nextstep-jax train` (configs/tiny, async checkpoint every step, so most moments fall inside
a save), pick a step k uniformly in [1, steps − 1] and SIGKILL the run a uniform random fraction of one step's
time (from a warm-cache calibration run) after its `step k` line, then rerun the same command until it exits 0. Prints one line per trial and a summary: divergent resumes
(params or loss history differ), kills that left an uncommitted (mid-save) checkpoint, steps resumed from.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only reads exports; keep libtpu out of it
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny" / "stage1_256px.py"


def _env(cache: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("XLA_FLAGS", None)
  return env


def _cmd(workdir: Path, steps: int) -> list[str]:
  return [sys.executable, "-m", "nextstep_jax.cli", "train", "--config", str(CONFIG), "--workdir", str(workdir),
          f"--config.train.steps={steps}", "--config.train.save_every=1", "--config.train.log_every=1",
          "--config.data.global_batch_size=16"]


def _run(workdir: Path, steps: int, env: dict) -> tuple[float, str]:
  """Runs to the end; returns (seconds from the first step line to exit, output)."""
  proc = subprocess.Popen(_cmd(workdir, steps), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  first, lines = None, []
  for line in proc.stdout:
    lines.append(line)
    if first is None and line.startswith("step "):
      first = time.perf_counter()
  proc.wait()
  if proc.returncode != 0:
    raise RuntimeError(f"train exited {proc.returncode}:\n{''.join(lines[-20:])}")
  return time.perf_counter() - (first or time.perf_counter()), "".join(lines)


def _run_and_kill(workdir: Path, steps: int, env: dict, at_step: int, delay: float) -> tuple[str, int]:
  """Starts a run, SIGKILLs it `delay` s after its `step at_step` line (or lets it finish); (output, returncode)."""
  proc = subprocess.Popen(_cmd(workdir, steps), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  lines, timer = [], None
  for line in proc.stdout:
    lines.append(line)
    if timer is None and line.startswith(f"step {at_step}:"):
      timer = threading.Timer(delay, lambda: proc.poll() is None and proc.send_signal(signal.SIGKILL))
      timer.start()
  proc.wait()
  if timer is not None:
    timer.cancel()
  return "".join(lines), proc.returncode


def _history(workdir: Path) -> list[tuple]:
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l]
  keys = ("step", "loss", "text_loss", "image_loss", "grad_norm")
  return [tuple(r.get(k) for k in keys) for r in rows]


def _params(workdir: Path) -> dict:
  from flax import traverse_util

  from nextstep_jax import params_io
  return {k: v.tobytes() for k, v in traverse_util.flatten_dict(params_io.load_params(workdir / "export" /
                                                                                          "params")).items()}


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--trials", type=int, default=20)
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--root", default=None, help="scratch directory (default: a new temp dir, removed at the end)")
  args = ap.parse_args()
  root = Path(args.root or tempfile.mkdtemp(prefix="kill_resume_soak_"))
  root.mkdir(parents=True, exist_ok=True)
  env = _env(str(root / "jax_cache"))
  rng = random.Random(args.seed)

  t0 = time.perf_counter()
  span, _ = _run(root / "reference", args.steps, env)
  ref_hist, ref_params = _history(root / "reference"), _params(root / "reference")
  warm, _ = _run(root / "calibration", args.steps, env)  # the trials run with a warm compilation cache
  per_step = warm / args.steps
  print(f"reference: {args.steps} steps, step phase {span:.1f} s cold, {warm:.1f} s warm, {len(ref_params)} params",
        flush=True)

  divergent, mid_save, not_killed, resumed_from, damaged = 0, 0, 0, [], 0
  for trial in range(args.trials):
    work = root / f"trial_{trial}"
    at_step, delay = rng.randint(1, args.steps - 1), rng.uniform(0, per_step)
    out, code = _run_and_kill(work, args.steps, env, at_step, delay)
    ckpts = work / "checkpoints"
    partial = ckpts.is_dir() and any("tmp" in p.name for p in ckpts.iterdir())
    killed = code == -signal.SIGKILL
    not_killed += not killed
    mid_save += killed and partial
    _, log = _run(work, args.steps, env)
    start = next((int(l.rsplit("/", 1)[1]) for l in log.splitlines() if l.startswith("resumed from")), 0)
    damaged += "is damaged" in log
    resumed_from.append(start)
    same = _history(work) == ref_hist and _params(work) == ref_params
    divergent += not same
    print(f"trial {trial:2d}: kill {delay:4.2f} s after step {at_step} ({'killed' if killed else 'finished first'}"
          f"{', mid-save' if partial else ''}), resumed from step {start}: "
          f"{'identical' if same else 'DIVERGENT'}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
  print(f"summary: {args.trials} trials, {args.trials - not_killed} killed ({mid_save} with a save in flight), "
        f"resumed from steps {sorted(resumed_from)}, damaged-step warnings {damaged}, "
        f"divergent resumes {divergent}; {time.perf_counter() - t0:.0f} s", flush=True)
  if not args.root:
    shutil.rmtree(root, ignore_errors=True)
  return 1 if divergent else 0


if __name__ == "__main__":
  sys.exit(main())
