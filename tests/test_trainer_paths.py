"""A stage-1 run as the recipe starts it: `init_from` a converted Qwen2.5 export (partial merge: the backbone from
Qwen, projectors and head freshly initialised) and `sample_every` writing sample grids during training."""
from pathlib import Path

import numpy as np
import pytest

from flax import traverse_util
from PIL import Image

from conftest import ROOT

from hf_models import make_qwen2
from nextstep_jax import params_io
from nextstep_jax.config import ModelConfig, VAEConfig, load_config
from nextstep_jax.convert.qwen import convert_qwen
from nextstep_jax.images import make_grid
from nextstep_jax.sampling.pipeline import Options, Sampler
from nextstep_jax.tokens import NextStepTokenizer
from nextstep_jax.train.loop import train

TINY1 = str(Path(ROOT) / "configs" / "tiny" / "stage1_256px.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory, production_model_dir):
  tmp = tmp_path_factory.mktemp("stage1_from_qwen")
  make_qwen2(str(tmp / "hf"), vocab_size=300, intermediate_size=128, rope_theta=1e6, max_position_embeddings=4096)
  convert_qwen(str(tmp / "hf"), tmp / "qwen")
  vae_src = production_model_dir  # VAE (scale 0.3611 / shift 0.1159) + tokenizer for the sample grids
  over = {"train.steps": 2, "train.lr": 0.0, "train.end_lr": 0.0, "train.warmup_steps": 0,
          "train.init_from": str(tmp / "qwen"), "train.vae_from": str(vae_src), "train.sample_every": 2,
          "train.sample_size": 16, "train.sample_steps": 2, "train.sample_prompts": "('a red cube', 'sky')"}
  config = load_config(TINY1, [f"--config.{k}={v}" for k, v in over.items()])
  train(config, str(tmp / "work"))
  return tmp, config


def test_stage1_starts_from_the_qwen_backbone(run):
  """lr 0: the export is the initial state — every Qwen leaf bit for bit, every other leaf freshly initialised."""
  tmp, _ = run
  qwen = traverse_util.flatten_dict(params_io.load_params(tmp / "qwen" / "params"))
  ours = traverse_util.flatten_dict(params_io.load_params(tmp / "work" / "export" / "params"))
  shared = set(qwen) & set(ours)
  assert len(shared) >= len(qwen) - 1 and any("embed" in "/".join(k) for k in shared)
  for k in shared:
    assert np.asarray(ours[k]).tobytes() == np.asarray(qwen[k]).tobytes(), "/".join(k)
  fresh = [k for k in ours if k not in qwen]
  assert any("image_head" in "/".join(k) for k in fresh) and any("image_in_projector" in "/".join(k) for k in fresh)


def test_sample_every_writes_the_samplers_images(run):
  """The in-training grid equals the library sampler's images for the exported params and the same options."""
  tmp, config = run
  png = tmp / "work" / "samples" / "step_00000002.png"
  assert png.is_file()
  vae_src = Path(config.train.vae_from)
  meta = params_io.read_model_config(vae_src)
  cfg = ModelConfig.from_dict(config.model.to_dict())
  sampler = Sampler(cfg, params_io.load_params(tmp / "work" / "export" / "params"),
                    VAEConfig.from_dict(meta["vae"]), params_io.load_params(vae_src / "vae_params"),
                    NextStepTokenizer(vae_src / "tokenizer"))
  t = config.train
  out = sampler.text_to_image(list(t.sample_prompts), Options(
      height=16, width=16, steps=2, cfg=t.sample_cfg, positive_prompt=None, negative_prompt="",
      buckets=(64, 128, 256)))
  np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), make_grid(out.images, ncols=2))
