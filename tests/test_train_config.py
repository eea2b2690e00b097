"""`config.train` / `config.dpo` validation: every nonsense value is one line naming the field, the value and the
fix, from the real CLI, before anything compiles (no compile event, no checkpoint written)."""
import os

import jax
import pytest

from conftest import ROOT
from nextstep_jax import cli
from nextstep_jax.config import ConfigError
from nextstep_jax.train.config import TrainConfig, train_section
from nextstep_jax.train.dpo import DpoConfig

TINY1 = os.path.join(ROOT, "configs", "tiny", "stage1_256px.py")
TINY_DPO = os.path.join(ROOT, "configs", "tiny", "dpo.py")
TINY_LORA = os.path.join(ROOT, "configs", "tiny", "lora_sft.py")

CASES = [  # (config file, override, what the one line must say)
    (TINY1, "--config.train.lrr=1e-4", "config has no field 'train.lrr'"),
    (TINY1, "--config.train.steps=ten", "train.steps"),
    (TINY1, "--config.train.lr=-1e-4", "config.train.lr=-0.0001 must be >= 0"),
    (TINY1, "--config.train.lr=nan", "config.train.lr=nan is not a finite number"),
    (TINY1, "--config.train.end_lr=inf", "config.train.end_lr=inf is not a finite number"),
    (TINY1, "--config.train.warmup_steps=100", "config.train.warmup_steps=100 exceeds steps=6"),
    (TINY1, "--config.train.microbatches=3", "config.train.microbatches=3 does not divide"),
    (TINY1, "--config.train.b2=1.5", "config.train.b2=1.5 must be in [0, 1)"),
    (TINY1, "--config.train.objective=ppo", "config.train.objective='ppo' is not one of ['dpo', 'fm', 'grpo', 'lora']"),
    (TINY_DPO, "--config.dpo.beta=0", "config.dpo.beta=0.0 must be > 0"),
    (TINY_DPO, "--config.dpo.beta=-5", "config.dpo.beta=-5.0 must be > 0"),
    (TINY_DPO, "--config.dpo.ref_dtype=int8", "config.dpo.ref_dtype='int8' is not one of"),
    (TINY_LORA, "--config.lora.rank=0", "config.lora.rank=0 must be a positive integer"),
    (TINY_LORA, "--config.lora.targets=['q','attn']", "config.lora.targets has unknown ['attn']"),
]


@pytest.fixture
def compile_events():
  events = []
  listener = lambda name, *_, **__: events.append(name) if "compile" in name else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  yield events
  jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("config,override,message", CASES, ids=[c[1].split(".", 2)[-1] for c in CASES])
def test_nonsense_value_is_one_line_before_anything_compiles(config, override, message, tmp_path, capsys,
                                                             compile_events):
  workdir = tmp_path / "work"
  code = cli.main(["train", "--config", config, "--workdir", str(workdir), override])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2
  assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
  assert compile_events == [] and not (workdir / "checkpoints").exists()


def test_library_views_refuse_unknown_and_mistyped_fields():
  with pytest.raises(ConfigError, match=r"config.train.lrr is not a known field; did you mean config.train.lr\?"):
    TrainConfig.from_config(dict(lrr=1e-4))
  with pytest.raises(ConfigError, match="config.train.steps='10' must be an integer"):
    TrainConfig.from_config(dict(steps="10"))
  with pytest.raises(ConfigError, match="config.train.export=1 must be True or False"):
    TrainConfig.from_config(dict(export=1))
  with pytest.raises(ConfigError, match="config.dpo.betta is not a known field; did you mean config.dpo.beta"):
    DpoConfig.from_config(dict(betta=1.0))
  with pytest.raises(ConfigError, match="config.train.lr=-1.0 must be >= 0"):
    train_section(lr=-1.0)


def test_defaults_are_written_once():
  """The ConfigDict section and the typed view agree field by field, and a config file's values come through."""
  section = train_section()
  assert TrainConfig.from_config(section) == TrainConfig()
  assert set(section.keys()) == {f for f in TrainConfig.__dataclass_fields__}
  assert TrainConfig.from_config(train_section(lr=3e-5, sample_prompts=["a", "b"])).sample_prompts == ("a", "b")
