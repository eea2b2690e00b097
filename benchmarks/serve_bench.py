"""Load test of `nextstep-jax serve` vs the batch sampler, on the sampling bench config, alternating in one run.

Model: benchmarks/sample_bench.py's 77.7M backbone (random weights; special ids moved to the byte tokenizer's),
256 image tokens (16×16 grid), 20 flow steps, CFG 7.5, fp32, prompt bucket 64 (a 40-byte caption). The VAE is
the tiny f2 one (256 tokens → 64² px) so the token engine, not a Flux-size conv decode, is measured.

  python benchmarks/serve_bench.py [--clients 1 4 16] [--slots 1 4 8] [--pairs 16x8] [--duration 90] [--rounds 2]

Per round, in this order: (b) sequential single-prompt `Sampler.text_to_image` calls for --duration seconds,
(c) one static batch of --static-batch images in one call, (a) every server configuration: C async HTTP clients
(httpx) post one image each in a loop for --duration seconds (in-flight requests then finish). Servers (one
per slot count) are started and warmed up first and sit idle while the others run. Printed per configuration:
images/min, image tokens/s, p50/p95/max latency, mean slot occupancy, and ratios to (b) and (c); medians over
rounds.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks import common  # noqa: E402,F401  (CPU-only environment)
from benchmarks.sample_bench import BENCH, CAPTION, CFG, GRID, STEPS  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SIZE = GRID * 4  # tiny VAE: f2 × patch 2
BYTE_IDS = dict(eos_token_id=256, pad_token_id=259, image_area_id=260, boi_id=261, eoi_id=262, image_placeholder_id=263)
WORDS = ("red", "blue", "green", "cube", "ball", "cone", "small", "large", "left", "right")


def caption(i: int) -> str:
  """A 40-byte caption (40 tokens with the byte tokenizer), different per request."""
  words = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12))
  return (f"{i:05d} " + words)[:CAPTION].ljust(CAPTION, ".")


def percentile(xs, q):
  xs = sorted(xs)
  return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


# ----------------------------------------------------------------------------------------------- baselines


def sampler_options(seed: int):
  from nextstep_jax.sampling.pipeline import Options
  return Options(height=SIZE, width=SIZE, cfg=CFG, steps=STEPS, positive_prompt="", negative_prompt="", seed=seed,
                 buckets=(64,), independent_noise=True)


def sequential(sampler, duration: float, start: int) -> dict:
  """(b): one prompt per call, back to back."""
  lat, t0 = [], time.perf_counter()
  i = start
  while time.perf_counter() - t0 < duration or not lat:
    t = time.perf_counter()
    sampler.text_to_image(caption(i), sampler_options(i))
    lat.append(time.perf_counter() - t)
    i += 1
  return dict(images=len(lat), seconds=time.perf_counter() - t0, latencies=lat, occupancy=1.0)


def static_batch(sampler, size: int, start: int) -> dict:
  """(c): `size` prompts started together in one call (every image its own noise)."""
  t = time.perf_counter()
  sampler.text_to_image([caption(start + j) for j in range(size)], sampler_options(start))
  s = time.perf_counter() - t
  return dict(images=size, seconds=s, latencies=[s] * size, occupancy=1.0)


# ----------------------------------------------------------------------------------------------- server


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(model_dir: str, slots: int, log_dir: str) -> tuple[subprocess.Popen, str]:
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  log = open(os.path.join(log_dir, f"serve_{slots}.log"), "w")
  proc = subprocess.Popen([sys.executable, "-m", "nextstep_jax.cli", "serve", "--checkpoint", model_dir, "--slots",
                           str(slots), "--size", f"{SIZE}x{SIZE}", "--steps", str(STEPS), "--port", str(port),
                           "--prompt-buckets", "64", "--positive-prompt", "", "--negative-prompt", "", "--max-queue",
                           "256", "--max-n", "1", "--request-timeout", "3600"],
                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 1800) -> None:
  import httpx
  t0 = time.time()
  while True:
    if proc.poll() is not None:
      raise SystemExit(f"server for {url} exited with {proc.returncode}; see its log")
    try:
      if httpx.get(url + "/healthz", timeout=2).status_code == 200:
        return
    except httpx.TransportError:
      pass
    if time.time() - t0 > timeout:
      raise SystemExit(f"server {url} not ready after {timeout} s")
    time.sleep(1)


async def drive(url: str, clients: int, slots: int, duration: float, start: int) -> dict:
  """(a): `clients` concurrent clients, each posting one image at a time until `duration` has passed."""
  import httpx
  lat, counter = [], [start]
  occupancy, stop = [], time.perf_counter() + duration

  async def client(http):
    while time.perf_counter() < stop:
      i = counter[0]
      counter[0] += 1
      t = time.perf_counter()
      r = await http.post(url + "/v1/images/generations", json={"prompt": caption(i), "seed": i, "cfg": CFG,
                                                                 "size": f"{SIZE}x{SIZE}"})
      r.raise_for_status()
      lat.append(time.perf_counter() - t)

  async def sample_occupancy(http):
    while time.perf_counter() < stop:
      text = (await http.get(url + "/metrics")).text
      active = next(float(x.split()[1]) for x in text.splitlines() if x.startswith("nextstep_active_slots "))
      occupancy.append(active / slots)
      await asyncio.sleep(0.5)

  async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=clients + 4)) as http:
    t0 = time.perf_counter()
    await asyncio.gather(sample_occupancy(http), *(client(http) for _ in range(clients)))
    seconds = time.perf_counter() - t0
  return dict(images=len(lat), seconds=seconds, latencies=lat,
              occupancy=statistics.mean(occupancy) if occupancy else float("nan"))


# ----------------------------------------------------------------------------------------------- main


def summary(runs: list[dict]) -> dict:
  rate = statistics.median(r["images"] / r["seconds"] for r in runs)
  lat = [x for r in runs for x in r["latencies"]]
  return dict(per_min=60 * rate, tokens_s=rate * GRID * GRID, p50=percentile(lat, 0.5), p95=percentile(lat, 0.95),
              max=max(lat), occupancy=statistics.median(r["occupancy"] for r in runs),
              images=sum(r["images"] for r in runs))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
  ap.add_argument("--slots", type=int, nargs="+", default=[1, 4, 8])
  ap.add_argument("--pairs", nargs="*", default=None, help="CxS pairs instead of the full matrix, e.g. 16x8 4x4")
  ap.add_argument("--duration", type=float, default=90.0, help="seconds of load per configuration and round")
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--static-batch", type=int, default=8)
  ap.add_argument("--model-dir", default=None, help="reuse a model directory written by an earlier run")
  args = ap.parse_args()
  pairs = ([tuple(int(x) for x in p.split("x")) for p in args.pairs] if args.pairs else
           [(c, s) for s in args.slots for c in args.clients])

  from nextstep_jax.config import ModelConfig, tiny_vae
  from nextstep_jax.sampling.pipeline import Sampler
  from nextstep_jax.serving.random_model import write_random_model_dir
  work = tempfile.mkdtemp(prefix="serve_bench_")
  model_dir = args.model_dir or str(write_random_model_dir(os.path.join(work, "model"), dict(BENCH, **BYTE_IDS),
                                                           tiny_vae()))
  servers = {s: start_server(model_dir, s, work) for s in sorted({s for _, s in pairs})}
  sampler = Sampler.from_checkpoint(model_dir)
  sampler.text_to_image(caption(0), sampler_options(0))  # compile (b)
  static_batch(sampler, args.static_batch, 0)  # compile (c)
  for s, (proc, url) in servers.items():
    wait_ready(proc, url)
  n_params = sum(x.size for x in __import__("jax").tree.leaves(sampler.params))
  cfg = ModelConfig.from_dict(dict(BENCH, **BYTE_IDS))
  print(f"bench model {n_params / 1e6:.1f}M parameters (backbone hidden {cfg.hidden_size} × {cfg.num_layers} layers), "
        f"{GRID * GRID} image tokens, {STEPS} flow steps, CFG {CFG}; {args.rounds} rounds × {args.duration:.0f} s; "
        f"logs {work}", flush=True)

  results = {"b": [], "c": [], **{p: [] for p in pairs}}
  seed = 1000
  for rnd in range(args.rounds):
    results["b"].append(sequential(sampler, args.duration, seed))
    seed += 10_000
    results["c"].append(static_batch(sampler, args.static_batch, seed))
    seed += 10_000
    for c, s in pairs:
      results[(c, s)].append(asyncio.run(drive(servers[s][1], c, s, args.duration, seed)))
      seed += 10_000
      r = results[(c, s)][-1]
      print(f"  round {rnd}: C={c} slots={s}: {r['images']} images in {r['seconds']:.0f} s", flush=True)

  seq, stat = summary(results["b"]), summary(results["c"])
  print(f"\n{'configuration':34s} {'img/min':>8s} {'tok/s':>7s} {'p50 s':>7s} {'p95 s':>7s} {'max s':>7s} "
        f"{'occup.':>6s} {'×seq':>5s} {'×static':>7s} {'images':>6s}")
  rows = [("(b) sequential Sampler calls", seq), (f"(c) static batch of {args.static_batch}", stat)]
  rows += [(f"(a) server C={c:2d} slots={s}", summary(results[(c, s)])) for c, s in pairs]
  for name, r in rows:
    print(f"{name:34s} {r['per_min']:8.2f} {r['tokens_s']:7.1f} {r['p50']:7.1f} {r['p95']:7.1f} {r['max']:7.1f} "
          f"{r['occupancy']:6.0%} {r['per_min'] / seq['per_min']:5.2f} {r['per_min'] / stat['per_min']:7.2f} "
          f"{r['images']:6d}")
  for proc, _ in servers.values():
    proc.terminate()
    proc.wait(120)


if __name__ == "__main__":
  main()
