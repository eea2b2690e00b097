"""Forward+backward compile and step time of the Qwen2 backbone on CPU (fp32), for `tiny` and a ~100M config.

  python benchmarks/backbone_bench.py [--batch 4 --seq 256]
"""
from __future__ import annotations

import argparse
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from benchmarks.common import timed  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nextstep_jax.config import ModelConfig, tiny  # noqa: E402
from nextstep_jax.models.qwen2 import Qwen2ForCausalLM  # noqa: E402

CONFIGS = {
    "tiny": tiny(),
    # ~100M: 12 layers, d 768, GQA 12/4, vocab 32k (like the sampler bench config but a real vocabulary)
    "100M": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                 num_kv_heads=4, head_dim=64),
}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=256)
  args = ap.parse_args()
  print(f"{'config':8} {'params':>12} {'compile+1st (s)':>16} {'step (s)':>10} {'tokens/s':>10}")
  for name, fields in CONFIGS.items():
    cfg = ModelConfig.from_dict(fields)
    model = Qwen2ForCausalLM(cfg)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq)), jnp.int32)
    params = jax.jit(lambda r: model.init(r, ids[:1, :2]))(jax.random.key(0))
    n = sum(x.size for x in jax.tree.leaves(params))

    def loss(p, i):
      logp = jax.nn.log_softmax(model.apply(p, i)[:, :-1])
      return -jnp.mean(jnp.take_along_axis(logp, i[:, 1:, None], -1))
    step = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    step.lower(params, ids).compile()
    compile_s = time.perf_counter() - t0
    _, steady, _ = timed(step, params, ids, repeats=3)
    print(f"{name:8} {n:>12,} {compile_s:>16.2f} {steady:>10.3f} {args.batch * args.seq / steady:>10.0f}")


if __name__ == "__main__":
  main()
