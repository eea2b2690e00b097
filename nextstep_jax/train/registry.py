"""The training objectives, by `config.train.objective` name: one row per objective (its file implements
`train/objective.py: Objective`)."""
from __future__ import annotations

from nextstep_jax.config import ConfigError
from nextstep_jax.train.dpo import Dpo
from nextstep_jax.train.grpo import Grpo
from nextstep_jax.train.lora import Lora
from nextstep_jax.train.objective import Objective
from nextstep_jax.train.step import FlowMatching

OBJECTIVES: dict[str, Objective] = {
    "fm": FlowMatching(),  # pre-training, SFT, editing (train/step.py)
    "dpo": Dpo(),  # flow-matching DPO on preference pairs (train/dpo.py)
    "grpo": Grpo(),  # NextStep-GRPO: on-policy RL with a flow SDE and parallel log-prob recompute (train/grpo.py)
    "lora": Lora(),  # flow matching through LoRA/QLoRA adapters on a frozen base (train/lora.py)
}


def get_objective(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ConfigError(f"config.train.objective={name!r} is not one of {sorted(OBJECTIVES)}; an objective is a file "
                      f"implementing train/objective.py's Objective plus a row in train/registry.py")
  return OBJECTIVES[name]
