"""Tiny NextStep model for CPU unit tests (hidden 64, 2 layers, GQA 4/2, head 48×2; tiny f2 VAE).

  nextstep-jax train --config configs/tiny.py --workdir /tmp/tiny
"""
from nextstep_jax.config import experiment, tiny, tiny_vae


def get_config(arg: str | None = None):
  return experiment(tiny(), tiny_vae())
