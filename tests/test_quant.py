"""int8 kernels (models/quant.py): per-layer round-trip bounds on the fixture weights, the int8 forward against the
float one, scale shardings from the rule table, and convert --quantize int8 → sample → export back."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from nextstep_jax import params_io, sharding
from nextstep_jax.cli import main
from nextstep_jax.config import ModelConfig, tiny
from nextstep_jax.models import quant
from nextstep_jax.models.nextstep import NextStep, abstract_params
from nextstep_jax.sampling.pipeline import Options, Sampler

OPTS = Options(height=16, width=16, steps=3, cfg=3.0, positive_prompt=None, negative_prompt="", buckets=(32,),
               decode=False)


@pytest.fixture(scope="module")
def dirs(fixtures_dir, tmp_path_factory):
  """(float model dir, int8 model dir) converted from the fixture release by the CLI."""
  root = tmp_path_factory.mktemp("quant")
  assert main(["convert", "nextstep", "--src", fixtures_dir, "--dst", str(root / "float")]) == 0
  assert main(["convert", "nextstep", "--src", fixtures_dir, "--dst", str(root / "int8"), "--quantize", "int8"]) == 0
  return root / "float", root / "int8"


def test_round_trip_error_per_layer_is_bounded(dirs):
  flat = traverse_util.flatten_dict(params_io.load_params(dirs[0] / "params"))
  q_flat = traverse_util.flatten_dict(params_io.load_params(dirs[1] / "params"))
  kernels = [p for p in q_flat if p[-1] == "kernel" and p[:-1] + (quant.SCALE,) in q_flat]
  assert len(kernels) == 7 and all("layers" in p for p in kernels)  # q k v o gate up down, stacked over layers
  for path in kernels:
    w, q, scale = flat[path], q_flat[path], q_flat[path[:-1] + (quant.SCALE,)]
    assert q.dtype == np.int8 and q.shape == w.shape
    axes = quant.contraction_axes(path)
    err = np.abs(quant.dequantize_array(q, scale, axes) - w)
    assert np.all(err <= np.expand_dims(scale, axes) / 2 + 1e-7), path
    rel = np.linalg.norm(err) / np.linalg.norm(w)
    worst = np.max(err / np.expand_dims(scale, axes))
    print(f"{'/'.join(path[-3:-1])}: relative round-trip error {rel:.2e}, max |err|/scale {worst:.3f}")
    assert rel < 0.01
  untouched = [p for p in flat if p not in kernels]
  assert all(np.array_equal(flat[p], q_flat[p]) for p in untouched)


def test_int8_forward_tracks_the_float_forward(dirs):
  meta = params_io.read_model_config(dirs[0])
  cfg = ModelConfig.from_dict(meta["model"])
  params = params_io.load_params(dirs[0] / "params")
  q_params = params_io.load_params(dirs[1] / "params")
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 250, (2, 12)), jnp.int32)
  model = NextStep(cfg)

  def hidden(p):
    with quant.quantized_dense():
      return model.apply(p, model.apply(p, ids, None, method=NextStep.embed_inputs), jnp.ones((2, 12), bool),
                         method=NextStep.hidden)[0]
  h, h_q = np.asarray(hidden(params)), np.asarray(jax.jit(hidden)(q_params))
  rel = np.linalg.norm(h_q - h) / np.linalg.norm(h)
  print(f"final hidden, int8 vs float: relative error {rel:.2e}")
  assert 0 < rel < 0.05


def test_scale_shardings_follow_the_kernels_output_axes():
  cfg = ModelConfig.from_dict(tiny())
  abstract, names = abstract_params(cfg)
  q_abstract, q_names = quant.quantized_abstract(abstract, names, include_head=True)
  mesh = sharding.mesh_from_shape((2, 2, 2))
  shard = traverse_util.flatten_dict(sharding.tree_shardings(q_names, q_abstract, mesh))
  flat_abs = traverse_util.flatten_dict(q_abstract)
  scales = [p for p in shard if p[-1] == quant.SCALE]
  assert any("image_head" in p for p in scales) and any("backbone" in p for p in scales)
  for path in scales:
    kernel_spec = shard[path[:-1] + ("kernel",)].spec
    axes = quant.contraction_axes(path[:-1] + ("kernel",))
    kernel_spec = tuple(kernel_spec) + (None,) * (len(flat_abs[path[:-1] + ("kernel",)].shape) - len(kernel_spec))
    want = tuple(s for i, s in enumerate(kernel_spec) if i not in axes)
    got = tuple(shard[path].spec) + (None,) * (len(want) - len(shard[path].spec))
    assert got == want, path
    assert flat_abs[path[:-1] + ("kernel",)].dtype == jnp.int8
  assert any(s is not None for p in scales for s in shard[p].spec)  # some scales are really sharded


def test_quantized_model_samples_and_converts_back(dirs, tmp_path):
  float_dir, int8_dir = dirs
  assert params_io.read_model_config(int8_dir)["quantization"] == {"mode": "int8", "include_head": False}
  want = Sampler.from_checkpoint(float_dir).text_to_image(["a red cube"], OPTS).tokens
  stored = Sampler.from_checkpoint(int8_dir, quantize="int8")
  assert stored.params["unstacked_layers"][0]["mlp"]["up_proj"]["kernel"].dtype == jnp.int8
  got = stored.text_to_image(["a red cube"], OPTS).tokens
  on_load = Sampler.from_checkpoint(float_dir, quantize="int8").text_to_image(["a red cube"], OPTS).tokens
  np.testing.assert_array_equal(got, on_load)  # stored int8 == float weights quantized on load
  err = np.abs(got - want).mean() / np.abs(want).mean()
  print(f"int8 vs float tokens: mean relative difference {err:.3f}")
  assert np.isfinite(got).all() and err < 0.25
  # back to the release layout (float kernels) and in again: the dequantized weights
  assert main(["convert", "export-nextstep", "--src", str(int8_dir), "--dst", str(tmp_path / "release")]) == 0
  assert main(["convert", "nextstep", "--src", str(tmp_path / "release"), "--dst", str(tmp_path / "back")]) == 0
  back = traverse_util.flatten_dict(params_io.load_params(tmp_path / "back" / "params"))
  q_flat = traverse_util.flatten_dict(params_io.load_params(int8_dir / "params"))
  path = ("params", "backbone", "layers", "self_attn", "o_proj", "kernel")
  deq = quant.dequantize_array(q_flat[path], q_flat[path[:-1] + (quant.SCALE,)], quant.contraction_axes(path))
  np.testing.assert_allclose(back[path], deq, rtol=1e-6, atol=1e-7)
  assert quant.SCALE not in {p[-1] for p in back}


def test_bad_quantize_values_one_line(dirs):
  with pytest.raises(ValueError, match="quantize='int4' is not one of"):
    Sampler.from_checkpoint(dirs[0], quantize="int4")
  assert main(["convert", "nextstep", "--src", "x", "--dst", "y", "--quantize-head"]) == 2
