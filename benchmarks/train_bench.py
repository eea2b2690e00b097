"""Training throughput on CPU with the sampler bench model (77.7M backbone, head 256×4, batch_mul 4).

Batch 4 × 300 tokens (40 text + prefix + 256 image placeholders + eoi), CE + FM loss, AdamW, one device.
Reports seconds/step and tokens/s in fp32 and with bf16 compute, compile time, MFU against a matmul probe measured
in the same process (fp32 and bf16-in/fp32-acc), and Orbax checkpoint save/restore time and size.

  python benchmarks/train_bench.py [--steps 5] [--dtypes float32 bfloat16] [--remat none dots_no_batch] [--scan-unroll 1 12]

bf16 compute on CPU runs the dense layers through `layers.mixed_dot` (bf16 dots with fp32 accumulation, forward
and backward); `--remat` compares layer-remat policies (on CPU, recomputing instead of storing the per-layer
activations saves more memory traffic than it costs).
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import timed  # noqa: E402
from benchmarks.sample_bench import BENCH  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from nextstep_jax import sharding  # noqa: E402
from nextstep_jax.config import ModelConfig  # noqa: E402
from nextstep_jax.data.pipeline import batch_shardings  # noqa: E402
from nextstep_jax.train import flops as flops_lib  # noqa: E402
from nextstep_jax.train.optimizer import make_optimizer  # noqa: E402
from nextstep_jax.train.state import init_state, state_shardings  # noqa: E402
from nextstep_jax.train.step import jit_train_step  # noqa: E402
from nextstep_jax.train.synthetic import synthetic_batch  # noqa: E402

BATCH, SEQ, IMAGE_TOKENS = 4, 300, 256


def matmul_probe(dtype) -> float:
  """Achieved FLOP/s of a large jitted matmul (bf16 inputs accumulate in fp32)."""
  a = jnp.ones((1024, 2048), dtype)
  b = jnp.ones((2048, 2048), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  _, t, _ = timed(f, a, b, repeats=5)
  return 2 * 1024 * 2048 * 2048 / t


def bench(dtype: str, steps: int, remat: str = "none", unroll: int = 1):
  cfg = ModelConfig.from_dict(dict(BENCH, dtype=dtype, fm_head_batch_mul=4, remat_policy=remat, scan_unroll=unroll))
  t = ml_collections.ConfigDict(dict(lr=1e-4, end_lr=1e-5, warmup_steps=10, steps=1000, schedule="cosine", b1=0.9,
                                     b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0))
  tx, sched = make_optimizer(t)
  mesh = sharding.mesh_from_shape((1, 1, 1))
  state = init_state(cfg, tx, mesh, jax.random.key(0))
  _, sh = state_shardings(cfg, tx, mesh)
  batch = synthetic_batch(cfg, 0, BATCH, SEQ, IMAGE_TOKENS, text_len=40)
  bsh = batch_shardings({k: v.shape for k, v in batch.items()}, mesh)
  batch = jax.device_put(batch, bsh)
  with sharding.use_mesh(mesh):
    step = jit_train_step(cfg, tx, sched, 1, sh, bsh, mesh, donate=False)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0
    _, step_s, (state, _) = timed(compiled, state, batch, jax.random.key(0), repeats=steps)
  tokens = BATCH * SEQ
  fl = flops_lib.train_step_flops(cfg, BATCH, SEQ, BATCH * IMAGE_TOKENS)
  return state, compile_s, step_s, tokens, fl


def checkpoint_io(state):
  from nextstep_jax.checkpoint import Checkpointer
  from nextstep_jax.train.synthetic import synthetic_iterator
  tmp = tempfile.mkdtemp()
  try:
    ck = Checkpointer(tmp, save_every=1, async_save=False)
    it = synthetic_iterator(ModelConfig.from_dict(BENCH), 4, 8, 2)
    t0 = time.perf_counter()
    ck.save(1, state, it, force=True)
    ck.wait()
    save_s = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp) for f in fs)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    t0 = time.perf_counter()
    jax.block_until_ready(ck.restore(1, abstract, it))
    restore_s = time.perf_counter() - t0
    ck.close()
    return save_s, restore_s, size
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  ap.add_argument("--remat", nargs="+", default=["none", "dots_no_batch"])
  ap.add_argument("--scan-unroll", type=int, nargs="+", default=[1], help="ModelConfig.scan_unroll values to compare")
  args = ap.parse_args()
  peaks = {"float32": matmul_probe(jnp.float32), "bfloat16": matmul_probe(jnp.bfloat16)}
  print(f"matmul probe: fp32 {peaks['float32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s")
  state = None
  for dtype in args.dtypes:
    for remat, unroll in itertools.product(args.remat, args.scan_unroll):
      state, compile_s, step_s, tokens, fl = bench(dtype, args.steps, remat, unroll)
      print(f"{dtype:9s} remat {remat:13s} unroll {unroll:2d}: {step_s:.2f} s/step, {tokens / step_s:6.0f} tokens/s, "
            f"compile {compile_s:.1f} s, "
            f"{fl.total / 1e12:.2f} TFLOP/step (backbone {fl.backbone / 1e12:.2f}, head {fl.head / 1e12:.2f}), "
            f"MFU {fl.total / step_s / peaks[dtype]:.0%} of the probe", flush=True)
  save_s, restore_s, size = checkpoint_io(state)
  print(f"checkpoint (params + AdamW state + data iterator): save {save_s:.2f} s, restore {restore_s:.2f} s, "
        f"{size / 2**20:.0f} MiB")


if __name__ == "__main__":
  main()
