"""A LoRA stage through `train()` (configs/tiny/lora_sft.py): adapter-only checkpoints with a base
pointer, the merged export as a plain model directory (what `sample`/`serve`/`export-nextstep` read), the adapters
alone, resume, and one-line errors for a missing or different base."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from nextstep_jax import params_io, sharding
from nextstep_jax.cli import main
from nextstep_jax.config import load_config
from nextstep_jax.convert.nextstep import export_nextstep
from nextstep_jax.errors import UserError
from nextstep_jax.models import lora as lora_lib
from nextstep_jax.models.nextstep import abstract_params
from nextstep_jax.train import lora
from nextstep_jax.train.loop import train
from nextstep_jax.train.state import load_init_params
from conftest import ROOT
from train_utils import TINY, random_params

SFT = os.path.join(ROOT, "configs", "tiny", "lora_sft.py")


def dir_bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def write_base(path, seed=0):
  params_io.save_params(path / "params", random_params(TINY, seed))
  params_io.write_model_config(path, {"model": TINY})
  return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  return write_base(tmp_path_factory.mktemp("base"))


def config(path, base_dir, **train):
  cfg = load_config(path, [f"--config.train.init_from={base_dir}"])
  cfg.train.update(train)
  return cfg


def test_lora_stage_checkpoints_adapters_and_exports_the_merged_model(base, tmp_path, capsys):
  wd = tmp_path / "run"
  r = train(config(SFT, base, save_every=4), str(wd))
  assert r.step == 4 and r.last_metrics["update_ok"] == 1.0
  pointer = json.loads((wd / lora.POINTER).read_text())
  assert pointer == {"path": str(base), "fingerprint": lora.base_fingerprint(str(base))}
  # checkpoints: adapters (+ their Adam moments) only — a fraction of the base
  ckpt, base_bytes = dir_bytes(wd / "checkpoints"), dir_bytes(base / "params")
  adapters = params_io.load_params(wd / "export_adapters" / "params")
  n_ad = lora_lib.count(adapters)
  n_model = sum(x.size for x in jax.tree.leaves(abstract_params(TINY)[0]))
  print(f"adapters {n_ad} of {n_model} params; checkpoints {ckpt} B for {len(os.listdir(wd / 'checkpoints'))} "
        f"steps kept, base params {base_bytes} B")
  assert set(adapters) == {"lora"} and n_ad < 0.1 * n_model
  meta = params_io.read_model_config(wd / "export_adapters")
  assert meta["lora"]["rank"] == 4 and meta["lora"]["base"] == pointer
  # the export: a plain model directory with the model's tree, = base + a·b·alpha/r (bf16 base kernels)
  exported = params_io.load_params(wd / "export" / "params")
  want = lora_lib.merge(lora.load_base(str(base), TINY, lora.LoraConfig.from_config(config(SFT, base).lora),
                                       sharding.mesh_from_shape((1, 1, 1))), adapters, 4, 8.0)
  flat_e, flat_w = traverse_util.flatten_dict(exported), traverse_util.flatten_dict(jax.device_get(want))
  assert set(flat_e) == set(traverse_util.flatten_dict(abstract_params(TINY)[0]))
  for k in flat_e:
    assert np.array_equal(np.asarray(flat_e[k], np.float32), np.asarray(flat_w[k], np.float32)), k
  q = flat_e[("params", "backbone", "layers", "self_attn", "q_proj", "kernel")]
  q0 = traverse_util.flatten_dict(random_params(TINY))[("params", "backbone", "layers", "self_attn", "q_proj",
                                                           "kernel")]
  assert not np.allclose(np.asarray(q, np.float32), q0, atol=1e-2)  # the adapters moved the kernel
  # the next stage / sample / serve read it like any export; the release-layout exporter writes it
  load_init_params(str(wd / "export"), TINY, sharding.mesh_from_shape((1, 1, 1)))
  files = export_nextstep(wd / "export", tmp_path / "release")
  assert files
  # the adapters alone merge onto their recorded base offline (fp32 here; the training export keeps the bf16
  # base's dtype), and onto a base of other shapes not at all (one line, exit 2)
  assert main(["lora", "merge", "--src", str(wd / "export_adapters"), "--dst", str(tmp_path / "merged")]) == 0
  flat_m = traverse_util.flatten_dict(params_io.load_params(tmp_path / "merged" / "params"))
  assert set(flat_m) == set(flat_e)
  for k in flat_e:
    np.testing.assert_allclose(np.asarray(flat_e[k], np.float32), flat_m[k], rtol=2e-2, atol=2e-3, err_msg=str(k))
  wide = tmp_path / "wide"
  params_io.save_params(wide / "params", random_params(dataclasses.replace(TINY, intermediate_size=256)))
  params_io.write_model_config(wide, {"model": dataclasses.replace(TINY, intermediate_size=256)})
  capsys.readouterr()
  assert main(["lora", "merge", "--src", str(wd / "export_adapters"), "--dst", str(tmp_path / "bad"),
               "--model", str(wide)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "trained on" in err and "mlp" in err, err
  # resume onto another base of the same shapes is refused in one line
  other = write_base(tmp_path / "other", seed=1)
  with pytest.raises(UserError) as e:
    train(config(SFT, other, steps=5, save_every=4), str(wd))
  assert "\n" not in str(e.value) and "fingerprint" in str(e.value)
  # … and continues exactly onto the original one
  r2 = train(config(SFT, base, steps=5, save_every=4), str(wd))
  assert r2.step == 5


@pytest.mark.parametrize("init_from, words", [("", "needs config.train.init_from"), ("nowhere", "no params/")])
def test_missing_base_is_one_line(tmp_path, init_from, words):
  cfg = load_config(SFT, [f"--config.train.init_from={init_from}"])
  with pytest.raises(UserError) as e:
    train(cfg, str(tmp_path / "w"))
  assert words in str(e.value) and "\n" not in str(e.value)
