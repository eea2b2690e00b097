"""Peak host RAM of `convert qwen` on a random Qwen2.5-0.5B-shaped checkpoint: memory ≈ one leaf, not the model.

  python benchmarks/convert_memory.py [--workdir /tmp/convert_bench] [--dtype float32]

Writes a random fp32 HF checkpoint (24 layers, d 896, 14/2 heads, vocab 151936, tied; ~2 GB) in shards, then runs
the conversion in a fresh subprocess and reports that process's peak RSS next to the checkpoint and tensor sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = __file__.rsplit("/", 2)[0]
sys.path.insert(0, ROOT)

QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                tie_word_embeddings=True, max_position_embeddings=32768, model_type="qwen2")


def write_random_checkpoint(path: str, layers: int) -> tuple[int, int]:
  from nextstep_jax.convert.safetensors_io import SafetensorsWriter
  c = dict(QWEN_05B, num_hidden_layers=layers)
  d, f, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
  kv = c["num_key_value_heads"] * hd
  shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.q_proj.weight": (d, d), p + "self_attn.q_proj.bias": (d,),
                   p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.k_proj.bias": (kv,),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.v_proj.bias": (kv,),
                   p + "self_attn.o_proj.weight": (d, d), p + "mlp.gate_proj.weight": (f, d),
                   p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)})
  w = SafetensorsWriter(path, max_shard_bytes=512 << 20)
  rng = np.random.default_rng(0)
  for k, s in shapes.items():
    w.add(k, rng.standard_normal(s, dtype=np.float32) * 0.02)
  w.close()
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(c, fh)
  sizes = [int(np.prod(s)) * 4 for s in shapes.values()]
  return sum(sizes), max(sizes)


def convert_peak(src: str, dst: str, dtype: str | None) -> tuple[float, float, float]:
  """(seconds, peak RSS MiB, baseline RSS MiB of the imports alone) of `convert_qwen` in a fresh process."""
  code = ("import resource,sys,time; sys.path.insert(0, %r); from nextstep_jax.convert.qwen import convert_qwen;"
          "t=time.time(); convert_qwen(%r, %r, %r); print(time.time()-t, "
          "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)") % (ROOT, src, dst, dtype)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  baseline = subprocess.run([sys.executable, "-c", "import resource, nextstep_jax.convert.qwen, jax; jax.devices();"
                             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"],
                            capture_output=True, text=True, env=env, cwd=ROOT)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
  if out.returncode:
    sys.exit(out.stderr)
  seconds, peak = map(float, out.stdout.split()[-2:])
  return seconds, peak, float(baseline.stdout.split()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", default="/tmp/convert_bench")
  ap.add_argument("--dtype", default=None)
  ap.add_argument("--layers", type=int, nargs="+", default=[24, 12], help="24 = the real 0.5B shape")
  args = ap.parse_args()
  for layers in args.layers:
    shutil.rmtree(args.workdir, ignore_errors=True)
    src, dst = os.path.join(args.workdir, "hf"), os.path.join(args.workdir, "ours")
    total, largest = write_random_checkpoint(src, layers)
    seconds, peak, base = convert_peak(src, dst, args.dtype)
    print(f"{layers} layers: checkpoint {total / 2**20:,.0f} MiB fp32, largest tensor {largest / 2**20:,.0f} MiB, "
          f"largest stacked leaf {layers * 4864 * 896 * 4 / 2**20:,.0f} MiB; conversion {seconds:.1f} s, "
          f"peak RSS {peak:,.0f} MiB = imports {base:,.0f} + {peak - base:,.0f} MiB "
          f"({(peak - base) * 2**20 / total:.0%} of the model, {(peak - base) * 2**20 / largest:.1f}× the largest "
          f"tensor)", flush=True)
  shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
