"""Input-pipeline throughput on CPU: samples/s of `nextstep_jax.data.pipeline` at 256² and 512².

  python benchmarks/data_bench.py [--seconds 8 --workers 0 2 --records 64]

Two paths per resolution, each without and with Grain worker processes:
  pixels   raw JPEG image-text records → decode, resize + center-crop to the fixed bucket, tokenise,
           `pixel_values` rows (encode_on_the_fly; what a train step with the VAE encoder consumes)
  latents  a latent cache (`data encode` output; random tokens here) → tokenise, official sequence,
           pack into 8192-token rows with aspect-ratio buckets (what the standard train step consumes)
Start-up (first batch) and steady state are reported separately. Worker processes are *spawned*: every worker
re-imports this module (hence the `__main__` guard) plus jax/grain/tfds/transformers, ~5 s or more each on a
loaded 2-core machine; absl flags are marked parsed by the pipeline. Numbers swing ~2× between runs on shared
CPUs (JAX_NOTES §2): compare rows of one run.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 2)[0])
import benchmarks.common  # noqa: E402,F401  (CPU-only environment)


def _write_jpegs(folder: Path, n: int, res: int) -> None:
  import numpy as np
  from PIL import Image

  rng = np.random.default_rng(0)
  folder.mkdir(parents=True)
  for i in range(n):  # photo-like sizes: 1.2–2× the bucket, varied aspect, smooth content (compresses like photos)
    h, w = int(res * rng.uniform(1.2, 2.0)), int(res * rng.uniform(1.2, 2.0))
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * (c + 1) + yy * (3 - c)) % 256 for c in range(3)], -1).astype(np.uint8)
    img = (img * 0.7 + rng.integers(0, 77, (h, w, 3))).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    (folder / f"{i:05d}.jpg").write_bytes(buf.getvalue())
    (folder / f"{i:05d}.txt").write_text(f"a synthetic photo number {i} with some gradient colours")


def _write_latents(dst: Path, n: int, res: int) -> str:
  import numpy as np

  from nextstep_jax.data.buckets import bucket_grids
  from nextstep_jax.data.builders import write_dataset

  grids = bucket_grids(res)
  rng = np.random.default_rng(0)

  def gen():
    for i in range(n):
      g = grids[i % len(grids)]
      yield i, dict(tokens=rng.normal(size=(g[0] * g[1], 64)).astype(np.float32), grid=np.array(g, np.int32),
                    caption=f"a synthetic photo number {i} with some gradient colours", meta="{}")
  return write_dataset("ns_latent_t2i", dst, gen)


def _measure(cfg, seconds: float) -> tuple[float, float]:
  from nextstep_jax.data import pipeline

  t0 = time.perf_counter()
  it = pipeline.make_iterator(cfg, 0, 1)
  next(it)
  startup = time.perf_counter() - t0
  samples, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    b = next(it)
    samples += int(((b["input_ids"] == 256) & (b["attention_mask"] == 1)).sum())  # one EOS per sample
  rate = samples / (time.perf_counter() - t0)
  it.close()
  return startup, rate


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seconds", type=float, default=8.0, help="steady-state measuring time per row")
  ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  ap.add_argument("--records", type=int, default=64)
  ap.add_argument("--resolutions", type=int, nargs="+", default=[256, 512])
  args = ap.parse_args()

  from nextstep_jax.data.builders import build_dataset
  from nextstep_jax.data.config import default_data_config
  from nextstep_jax.tokens import make_byte_tokenizer

  tmp = Path(tempfile.mkdtemp(prefix="data_bench_"))
  tok = make_byte_tokenizer(tmp / "tok")
  print(f"{'path':8} {'res':>5} {'workers':>8} {'startup (s)':>12} {'samples/s':>10}", flush=True)
  for res in args.resolutions:
    _write_jpegs(tmp / f"jpg{res}", args.records, res)
    pixels = build_dataset("image_text", tmp / f"pix{res}", src=tmp / f"jpg{res}")
    latents = _write_latents(tmp / f"lat{res}", args.records, res)
    for path in ("pixels", "latents"):
      for workers in args.workers:
        c = default_data_config()
        c.sources = [dict(name=path, path=pixels if path == "pixels" else latents, weight=1.0, kind="t2i")]
        c.update(tokenizer=tok, resolution=res, num_workers=workers, read_threads=2, global_batch_size=8)
        if path == "pixels":
          c.update(encode_on_the_fly=True, buckets="fixed", pack=False, seq_len=(res // 16) ** 2 + 128)
        else:
          c.update(seq_len=8192, max_image_tokens=8192)
        startup, rate = _measure(c, args.seconds)
        print(f"{path:8} {res:>5} {workers:>8} {startup:>12.1f} {rate:>10.1f}", flush=True)


if __name__ == "__main__":
  main()
