"""Qwen2.5-14B backbone shape (the NextStep-1-Large LM): 48 layers, d 5120, 40/8 heads, head_dim 128, θ 1e6.

Used for conversion (`nextstep-jax convert qwen`) and abstract sharding checks; the full NextStep-1 model preset
is `nextstep_jax.config.nextstep1_14b()` (configs/nextstep1_14b/).
"""
from nextstep_jax.config import experiment, flux_vae, mesh_section, qwen2_5_14b


def get_config(arg: str | None = None):
  cfg = experiment(dict(qwen2_5_14b(), dtype="bfloat16", remat_policy="full"), flux_vae())
  cfg.mesh = mesh_section(data=1, fsdp=-1, tensor=1)
  return cfg
