"""Per-worker throughput of the scale-out data path on this CPU, side by side in one run, at 256² and 512²:

  build, 1 worker     `data build --kind wds` in this process (tar shards → ArrayRecord; image bytes copied)
  build, Beam W       the same shards on Apache Beam's DirectRunner with W worker processes, start-up included
                      (a tiny build's wall time is printed beside it); needs apache-beam: run it in the Beam
                      environment (.ci/run's .venv-beam), otherwise that column says why not
  prepare, 1 thread   the host side of the encode: JPEG decode + resize/crop to the bucket (`prepare_image`)
  encode, 1 process   the latent encode (`make_encoder`): real-size Flux VAE, fp32, random weights, 1 CPU device,
                      with the compiled program's FLOPs per image (XLA cost analysis) for the pod estimate

Images are smooth gradients saved as JPEG (quality 90). The figures and the estimate built on them: docs/DATA.md.

  PYTHONPATH=. python benchmarks/data_scale_bench.py --samples 4096 --workers 2 --encode-batch 2
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import tensorflow_datasets as tfds
import webdataset
from PIL import Image

from nextstep_jax.config import LATENT_PATCH_SIZE, VAEConfig, flux_vae
from nextstep_jax.data import wds
from nextstep_jax.data.buckets import bucket_grids
from nextstep_jax.data.builders import open_dataset
from nextstep_jax.data.latent_cache import make_encoder
from nextstep_jax.data.samples import prepare_image
from nextstep_jax.models import flux_vae as fv
from nextstep_jax.models.flux_vae import encode_latents
from nextstep_jax.models.latents import patchify


def _jpeg(side: int, seed: int) -> bytes:
  y, x = np.mgrid[0:side, 0:side] / side
  rgb = np.stack([x, y, (x + y + seed % 7 / 7) % 1], -1) * 255
  buf = io.BytesIO()
  Image.fromarray(rgb.astype(np.uint8)).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def write_shards(side: int, n: int, shards: int, root: Path) -> str:
  """n official-layout t2i samples (`key.json` + `key-0.jpg`) in `shards` tar files; returns the brace pattern."""
  root.mkdir(parents=True)
  per = -(-n // shards)
  for j in range(shards):
    with webdataset.TarWriter(str(root / f"{j:05d}.tar")) as sink:
      for i in range(j * per, min(n, (j + 1) * per)):
        sink.write({"__key__": f"k{i}", "json": json.dumps({"caption": f"sample {i}"}).encode()})
        sink.write({"__key__": f"k{i}-0", "jpg": _jpeg(side, i)})
  return str(root / f"{{00000..{shards - 1:05d}}}.tar")


def build_inprocess(src: str, dst: Path) -> float:
  t = time.perf_counter()
  out, _ = wds.build_foreign("wds", src, dst, task="t2i")
  dt = time.perf_counter() - t
  return len(open_dataset(out)) / dt


def build_beam(src: str, tiny_src: str, dst: Path, workers: int) -> tuple[float | None, str]:
  """(samples/s of the whole Beam build, start-up included; note with the wall time of the same build over
  `tiny_src`, one sample per shard: the pipeline's fixed start-up cost)."""
  try:
    import apache_beam  # noqa: F401
  except ImportError:
    return None, "not measured: no apache-beam here (Beam venv)"
  from nextstep_jax.data.beam_build import build_wds_beam
  t = time.perf_counter()
  build_wds_beam(tiny_src, dst / "tiny", task="t2i", workers=workers)
  startup = time.perf_counter() - t
  t = time.perf_counter()
  out = build_wds_beam(src, dst / "full", task="t2i", workers=workers)
  dt = time.perf_counter() - t
  return len(open_dataset(out)) / dt, f"{dt:.0f} s wall; tiny build {startup:.0f} s"


def prepare_rate(side: int, n: int = 64) -> float:
  """Images/s of the host side of the encode (JPEG decode + resize/crop to the bucket, `prepare_image`), one
  thread, from 1.5×-side JPEGs (downscaled, as photos are)."""
  images = [_jpeg(side * 3 // 2, i) for i in range(n)]
  grids = bucket_grids(side, 8 * LATENT_PATCH_SIZE, "aspect")  # Flux VAE: 8 px per latent, 2×2 per token
  t = time.perf_counter()
  for data in images:
    prepare_image(data, grids, 8 * LATENT_PATCH_SIZE)
  return n / (time.perf_counter() - t)


def encode_rate(side: int, batches: int, batch: int) -> tuple[float, float]:
  """(images/s, FLOPs per image of the compiled encoder) for the real-size Flux VAE on one CPU device."""
  cfg = VAEConfig(**flux_vae()).validate()
  params = jax.jit(lambda k: fv.init_params(cfg, k))(jax.random.key(0))
  x = np.random.default_rng(0).integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
  lowered = jax.jit(lambda p, v: patchify(encode_latents(p, cfg, v, deterministic=True), LATENT_PATCH_SIZE)).lower(
      params, jax.ShapeDtypeStruct((batch, side, side, 3), np.float32))
  cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  enc = make_encoder(cfg, params, shard=False)
  enc(x)  # compile
  t = time.perf_counter()
  for _ in range(batches):
    enc(x)
  return batches * batch / (time.perf_counter() - t), float(cost.get("flops", 0.0)) / batch


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--samples", type=int, default=512, help="samples per resolution for the builds")
  ap.add_argument("--workers", type=int, default=2, help="Beam DirectRunner worker processes")
  ap.add_argument("--encode-batch", type=int, default=2, help="images per encoder call")
  ap.add_argument("--encode-batches", type=int, default=1, help="timed encoder calls (after one compile call)")
  ap.add_argument("--sides", default="256,512")
  args = ap.parse_args(argv)
  tfds.display_progress_bar(False)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {args.samples} samples per build, "
        f"{args.encode_batches}×{args.encode_batch} images per encode", flush=True)
  print(f"{'side':>5} | {'build 1 worker':>15} | {f'build Beam {args.workers} workers (per worker)':>46} | "
        f"{'prepare 1 thread':>16} | {'encode 1 process':>17} | FLOPs/image", flush=True)
  with tempfile.TemporaryDirectory() as d:
    for side in (int(s) for s in args.sides.split(",")):
      src = write_shards(side, args.samples, max(args.workers, 1) * 2, Path(d) / f"shards{side}")
      one = build_inprocess(src, Path(d) / f"inproc{side}")
      tiny = write_shards(side, max(args.workers, 1) * 2, max(args.workers, 1) * 2, Path(d) / f"tiny{side}")
      beam, note = build_beam(src, tiny, Path(d) / f"beam{side}", args.workers)
      beam_txt = f"{beam:7.1f} ({beam / args.workers:6.1f}) samples/s, {note}" if beam else note
      prep = prepare_rate(side)
      rate, flops = encode_rate(side, args.encode_batches, args.encode_batch)
      print(f"{side:>4}² | {one:9.1f} /s    | {beam_txt:>46} | {prep:10.1f} /s  | {rate:11.3f} /s   | "
            f"{flops / 1e12:.3f} T", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
