"""Per-worker throughput of the scale-out data path on this CPU: `data build --kind wds` (tar → ArrayRecord, one
process) and the latent encode (real-size Flux VAE, random weights, batch 4) at 256² and 512² — the inputs of the
pod/Beam estimate in docs/DATA.md. Images are smooth gradients saved as JPEG (photo-like sizes, ≈ 10–40 KB).

  python benchmarks/data_scale_bench.py --samples 64 --encode-batches 2
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np


def _jpeg(side: int, seed: int) -> bytes:
  from PIL import Image
  y, x = np.mgrid[0:side, 0:side] / side
  rgb = np.stack([x, y, (x + y + seed % 7 / 7) % 1], -1) * 255
  buf = io.BytesIO()
  Image.fromarray(rgb.astype(np.uint8)).save(buf, "JPEG", quality=90)
  return buf.getvalue()


def build_rate(side: int, n: int, root: Path) -> float:
  import json

  import webdataset

  from nextstep_jax.data import wds
  shard = root / f"s{side}.tar"
  with webdataset.TarWriter(str(shard)) as sink:
    for i in range(n):
      sink.write({"__key__": f"k{i}", "json": json.dumps({"caption": f"sample {i}"}).encode()})
      sink.write({"__key__": f"k{i}-0", "jpg": _jpeg(side, i)})
  t = time.perf_counter()
  wds.build_foreign("wds", str(shard), root / f"out{side}", task="t2i")
  return n / (time.perf_counter() - t)


def encode_rate(side: int, batches: int, batch: int = 4) -> float:
  import jax

  from nextstep_jax.config import VAEConfig, flux_vae
  from nextstep_jax.data.latent_cache import make_encoder
  from nextstep_jax.models import flux_vae as fv
  cfg = VAEConfig(**flux_vae()).validate()
  params = jax.jit(lambda k: fv.init_params(cfg, k))(jax.random.key(0))
  enc = make_encoder(cfg, params, shard=False)
  x = np.random.default_rng(0).integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
  enc(x)  # compile
  t = time.perf_counter()
  for _ in range(batches):
    enc(x)
  return batches * batch / (time.perf_counter() - t)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--samples", type=int, default=64)
  ap.add_argument("--encode-batches", type=int, default=2)
  args = ap.parse_args(argv)
  with tempfile.TemporaryDirectory() as d:
    for side in (256, 512):
      b = build_rate(side, args.samples, Path(d))
      e = encode_rate(side, args.encode_batches)
      print(f"{side}²: build {b:8.1f} samples/s per worker | encode (Flux VAE fp32, CPU) {e:6.2f} samples/s per "
            f"process", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
