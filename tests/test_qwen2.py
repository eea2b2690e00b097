"""Qwen2 backbone: parity with transformers (torch), KV-cache decoding, conversion round trip, bad input."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hf_models import make_qwen2, torch_logits
from nextstep_jax import params_io
from nextstep_jax.convert.qwen import convert_qwen, export_qwen
from nextstep_jax.convert.table import ConversionError
from nextstep_jax.models.qwen2 import Qwen2ForCausalLM, init_cache
from nextstep_jax.sampling import decode_layout


def _convert(tmp_path, name, **kw):
  hf_dir, ours = str(tmp_path / f"{name}_hf"), str(tmp_path / f"{name}_ours")
  model = make_qwen2(hf_dir, **kw)
  cfg = convert_qwen(hf_dir, ours)
  return model, cfg, params_io.load_params(os.path.join(ours, "params")), hf_dir, ours


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers(tmp_path, tie):
  model, cfg, params, _, _ = _convert(tmp_path, "m", tie=tie, seed=3 if tie else 4)
  assert cfg.tie_word_embeddings == tie
  ids = np.random.RandomState(0).randint(0, 128, (2, 13))
  ref = torch_logits(model, ids)
  ours = np.asarray(Qwen2ForCausalLM(cfg).apply(params, jnp.asarray(ids)))
  err = np.abs(ours - ref).max()
  print(f"fp32 logits max abs error (tie={tie}): {err:.2e}")
  assert err <= 1e-4


def test_left_padded_batch_matches_transformers(tmp_path):
  """Left padding with raw positions (official NextStep semantics): real positions match."""
  model, cfg, params, _, _ = _convert(tmp_path, "pad", head_dim=24, rope_theta=1e6)
  assert cfg.resolved_head_dim == 24
  ids = np.random.RandomState(1).randint(0, 128, (3, 10))
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  mask[2, :7] = 0
  ref = torch_logits(model, ids, mask)
  ours = np.asarray(Qwen2ForCausalLM(cfg).apply(params, jnp.asarray(ids), jnp.asarray(mask)))
  err = np.abs(ours - ref)[mask.astype(bool)].max()
  print(f"left-padded fp32 logits max abs error: {err:.2e}")
  assert err <= 1e-4


def test_kv_cache_decoding_equals_full_forward(tmp_path):
  _, cfg, params, _, _ = _convert(tmp_path, "kv")
  model = Qwen2ForCausalLM(cfg)
  ids = jnp.asarray(np.random.RandomState(2).randint(0, 128, (2, 12)))
  mask = jnp.asarray(np.array([[1] * 12, [0] * 4 + [1] * 8]))
  full = np.asarray(model.apply(params, ids, mask))
  cache_len = 16
  key_valid = jnp.concatenate([mask, jnp.ones((2, cache_len - 12), mask.dtype)], axis=1)
  cache = init_cache(cfg, 2, cache_len, jnp.float32)
  step = jax.jit(lambda p, i, c, idx: model.apply(p, i, key_valid, c, idx, method=model.decode))
  # prefill 5 tokens, then decode one token at a time
  logits, cache = step(params, ids[:, :5], cache, 0)
  outs = [np.asarray(logits)]
  for t in range(5, 12):
    logits, cache = step(params, ids[:, t:t + 1], cache, t)
    outs.append(np.asarray(logits))
  dec = np.concatenate(outs, axis=1)
  err = np.abs(dec - full)[np.asarray(mask).astype(bool)].max()
  print(f"KV-cache vs full forward max abs error: {err:.2e}")
  assert err <= 1e-5
  per_layer = decode_layout.init_cache(cfg, 2, cache_len, jnp.float32, per_layer=True)  # the unrolled layers'
  with pytest.raises(ValueError, match="per-layer KV caches"):
    model.apply(params, ids[:, :5], key_valid, per_layer, 0, method=model.decode)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_round_trip_bit_exact(tmp_path, dtype):
  _, _, _, hf_dir, ours = _convert(tmp_path, "rt", dtype=dtype, tie=dtype == "bfloat16")
  out = tmp_path / "exported"
  export_qwen(ours, out, max_shard_bytes=40_000)  # force several shards + an index
  assert (out / "model.safetensors.index.json").is_file()
  src = load_file(os.path.join(hf_dir, "model.safetensors"))
  got = {}
  for f in out.glob("model-*.safetensors"):
    got.update(load_file(str(f)))
  assert set(got) == set(src)
  for k, v in src.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    assert got[k].tobytes() == v.tobytes(), k
  exported_cfg = json.loads((out / "config.json").read_text())
  assert exported_cfg["num_hidden_layers"] == 2 and exported_cfg["tie_word_embeddings"] == (dtype == "bfloat16")


def test_exported_checkpoint_loads_in_transformers(tmp_path):
  import torch
  import transformers
  model, _, _, _, ours = _convert(tmp_path, "hfload", head_dim=24)
  export_qwen(ours, tmp_path / "exp")
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "exp"), dtype=torch.float32).eval()
  ids = np.random.RandomState(5).randint(0, 128, (1, 7))
  np.testing.assert_array_equal(torch_logits(reloaded, ids), torch_logits(model, ids))


def _edit_checkpoint(hf_dir, fn):
  path = os.path.join(hf_dir, "model.safetensors")
  tensors = load_file(path)
  fn(tensors)
  save_file(tensors, path)


def test_missing_extra_and_misshaped_keys_listed_in_one_error(tmp_path):
  hf_dir = str(tmp_path / "bad")
  make_qwen2(hf_dir)

  def damage(t):
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.0.self_attn.rotary_extra"] = np.zeros(3, np.float32)
    t["model.norm.weight"] = np.zeros(65, np.float32)
  _edit_checkpoint(hf_dir, damage)
  with pytest.raises(ConversionError) as e:
    convert_qwen(hf_dir, tmp_path / "out")
  msg = str(e.value)
  assert "missing 1 tensor(s): model.layers.1.mlp.up_proj.weight" in msg
  assert "unexpected 1 tensor(s): model.layers.0.self_attn.rotary_extra" in msg
  assert "model.norm.weight has shape (65,), expected (64,)" in msg
  assert not (tmp_path / "out" / "params").exists()


def test_bad_dtype_name_and_missing_config(tmp_path):
  hf_dir = str(tmp_path / "hf")
  make_qwen2(hf_dir)
  with pytest.raises(ConversionError, match="unknown dtype 'bfloat17'; use one of float32, bfloat16, float16"):
    convert_qwen(hf_dir, tmp_path / "o", dtype="bfloat17")
  os.remove(os.path.join(hf_dir, "config.json"))
  with pytest.raises(FileNotFoundError, match="HF config.json not found"):
    convert_qwen(hf_dir, tmp_path / "o2")


def test_convert_cli_and_dtype_option(tmp_path):
  from nextstep_jax.cli import main
  hf_dir = str(tmp_path / "hf")
  make_qwen2(hf_dir)
  assert main(["convert", "qwen", "--src", hf_dir, "--dst", str(tmp_path / "o"), "--dtype", "bfloat16"]) == 0
  meta = params_io.param_metadata(tmp_path / "o" / "params")
  assert all(str(dt) == "bfloat16" for _, dt in meta.values())
  assert main(["convert", "qwen", "--src", hf_dir, "--dst", str(tmp_path / "o")]) == 2  # exists, no --overwrite
  assert main(["convert", "qwen", "--src", str(tmp_path / "nowhere"), "--dst", str(tmp_path / "o3")]) == 2
