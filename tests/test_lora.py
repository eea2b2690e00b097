"""LoRA / QLoRA (train/lora.py, models/lora.py) on the tiny model: fresh adapters change nothing (bit for bit),
training moves only adapter leaves (the base stays bit-identical, the optimizer state is adapter-sized), the merged
model equals the unmerged forward (fp32, 1e-5), sharded == single device on the four test meshes, bad configs and
mismatched bases are one-line errors."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import traverse_util

from nextstep_jax import sharding
from nextstep_jax.config import ConfigError
from nextstep_jax.models import lora as lora_lib
from nextstep_jax.models import quant
from nextstep_jax.models.nextstep import NextStep, abstract_params, draw_fm_noise
from nextstep_jax.train import lora
from nextstep_jax.train.optimizer import make_optimizer
from nextstep_jax.train.state import init_state, state_shardings
from nextstep_jax.train.synthetic import synthetic_batch
from sharding_harness import TEST_MESHES, max_relative_error
from train_utils import TINY, random_params, train_cfg, train_on_mesh

ALL = lora.DEFAULT_TARGETS + ("head", "image_in", "image_out")
LCFG = lora.LoraConfig(rank=4, alpha=8.0, targets=ALL, base_dtype="float32")
B, L, T = 8, 40, 16


def batches(n):
  return [synthetic_batch(TINY, i, B, L, T) for i in range(n)]


def fresh_adapters(lcfg=LCFG, seed=0):
  return jax.tree.map(lambda x: x.value, lora.Lora().trainable_init(TINY, lcfg)(jax.random.key(seed)),
                      is_leaf=lambda x: hasattr(x, "names"))


def loss_terms(variables, batch, lcfg=None, int8=False):
  """The model's loss sums on `batch` with fixed draws: base only (lcfg None) or base + adapters."""
  noise, u = draw_fm_noise(TINY, jax.random.key(5), B, T)
  model = NextStep(TINY)
  if lcfg is None:
    with quant.quantized_dense(weight_only=True):
      return jax.device_get(jax.jit(lambda v: model.apply(v, batch, noise, u, method=NextStep.loss_terms))(
          variables))
  base, adapters = variables
  fn = lambda b, a: lora.lora_apply(lcfg, b, None, model, a, batch, noise, u, method=NextStep.loss_terms)
  return jax.device_get(jax.jit(fn)(base, adapters))


def run_lora(mesh_shape, base, steps=3, lcfg=LCFG):
  """(adapters after `steps`, per-step metrics) on a mesh; the base bound into the step."""
  init = lora.Lora().trainable_init(TINY, lcfg)
  abstract, names = lora.base_layout(TINY, lcfg)

  def bound(sh):
    return jax.device_put(base, sharding.tree_shardings(names, abstract, sh.step.mesh))

  params, hist, _ = train_on_mesh(
      mesh_shape, batches(steps),
      lambda tx, sched, sh, bsh, mesh: lora.jit_lora_step(TINY, lcfg, tx, sched, 1, sh, bsh, mesh),
      None, tcfg=train_cfg(weight_decay=0.0), bound=bound, init=init)
  return params, hist


@pytest.fixture(scope="module")
def base():
  return random_params(TINY)


@pytest.fixture(scope="module")
def single(base):
  return run_lora((1, 1, 1), base)


def test_fresh_adapters_change_nothing_bit_for_bit(base):
  batch = batches(1)[0]
  want = loss_terms(base, batch)
  got = loss_terms((base, fresh_adapters()), batch, LCFG)
  for k in want:
    assert np.array_equal(np.asarray(got[k]), np.asarray(want[k])), k
  # QLoRA: int8 base + fresh adapters == the int8 base alone, to fp32 rounding (XLA fuses the zero branch into
  # the dequantizing multiply-add differently: 1 ulp of fm_sum measured)
  q = quant.quantize_params(base)
  want8 = loss_terms(q, batch)
  got8 = loss_terms((q, fresh_adapters()), batch, LCFG)
  for k in want8:
    np.testing.assert_allclose(np.asarray(got8[k]), np.asarray(want8[k]), rtol=1e-6, err_msg=k)


def test_adapters_follow_the_base_kernels_logical_axes():
  abstract, names = abstract_params(TINY)
  layout, ad_names = lora_lib.adapter_layout(abstract, names, 4, ALL)
  flat_names = traverse_util.flatten_dict(ad_names)
  assert flat_names[("lora", "backbone", "layers", "self_attn", "q_proj", "a")] == ("layers", "embed", "lora_rank")
  assert flat_names[("lora", "backbone", "layers", "self_attn", "q_proj", "b")] == (
      "layers", "lora_rank", "q_heads", "head_dim")
  assert flat_names[("lora", "backbone", "layers", "self_attn", "o_proj", "a")] == (
      "layers", "q_heads", "head_dim", "lora_rank")
  assert flat_names[("lora", "image_head", "res_blocks", "mlp_0", "b")] == ("layers", "lora_rank", "fm_mlp")
  flat = traverse_util.flatten_dict(layout)
  assert all(s.dtype == np.float32 for s in flat.values())
  # every adapted kernel of the model: 7 backbone kernels + 9 head linears + 2 projectors
  assert len(flat) == 2 * (7 + 9 + 2)


def test_training_moves_only_adapters_and_optimizer_state_is_adapter_sized(base, single):
  """fp32 base on the test meshes (`single`); QLoRA (int8 base, dropout) here: the base bit-identical after steps."""
  adapters, hist = single
  assert all(bool(h["update_ok"]) for h in hist) and float(hist[-1]["loss"]) < float(hist[0]["loss"])
  fresh = fresh_adapters()
  flat, flat0 = traverse_util.flatten_dict(adapters), traverse_util.flatten_dict(fresh)
  assert set(flat) == set(flat0)
  assert all(not np.array_equal(flat[k], flat0[k]) for k in flat)  # every adapter leaf moved
  # the base, bound into every step, is bit-identical afterwards (and never part of the state)
  tx, _ = make_optimizer(train_cfg())
  mesh = sharding.mesh_from_shape((1, 1, 1))
  qcfg = dataclasses.replace(LCFG, base_dtype="int8", dropout=0.1)
  init = lora.Lora().trainable_init(TINY, qcfg)
  state = init_state(TINY, tx, mesh, jax.random.key(0), init=init)
  base_dev = jax.device_put(quant.quantize_params(base))
  before = jax.device_get(base_dev)
  step = lora.jit_lora_step(TINY, qcfg, tx, lambda s: 1e-3, 1, jax.tree.map(lambda x: x.sharding, state),
                            jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                                         batches(1)[0]), mesh)
  losses = []
  for b in batches(3):
    state, m = step(state, base_dev, b, jax.random.key(1))
    losses.append(float(m["loss"]))
  assert all(np.isfinite(losses)) and int(state.skipped) == 0
  for k, v in traverse_util.flatten_dict(jax.device_get(base_dev)).items():
    assert np.array_equal(v, traverse_util.flatten_dict(before)[k]), k
  assert all(not np.array_equal(v, flat0[k]) for k, v in traverse_util.flatten_dict(state.params).items())
  assert set(traverse_util.flatten_dict(state.params)) == set(flat0)
  n_model = sum(x.size for x in jax.tree.leaves(base))
  n_adapter = lora_lib.count(adapters)
  n_opt = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
  assert n_opt <= 2 * n_adapter + 8  # Adam's two moments (+ counters): the adapters', never the model's
  assert n_opt / n_model == pytest.approx(2 * n_adapter / n_model, abs=1e-4)
  assert n_adapter / n_model < 0.2
  print(f"model {n_model}, adapters {n_adapter} ({n_adapter / n_model:.1%}), optimizer state {n_opt}")


def test_merged_model_equals_unmerged_forward(base, single):
  adapters = single[0]
  batch = batches(1)[0]
  unmerged = loss_terms((base, adapters), batch, LCFG)
  merged = loss_terms(jax.device_get(lora_lib.merge(base, adapters, LCFG.rank, LCFG.alpha)), batch)
  base_only = loss_terms(base, batch)
  err = max_relative_error({k: merged[k] for k in ("ce_sum", "fm_sum")},
                           {k: unmerged[k] for k in ("ce_sum", "fm_sum")})
  moved = max_relative_error({k: base_only[k] for k in ("ce_sum", "fm_sum")},
                             {k: unmerged[k] for k in ("ce_sum", "fm_sum")})
  print(f"merged vs unmerged {err:.1e}; adapters moved the loss terms by {moved:.1e}")
  assert err <= 1e-5 and moved > 1e-3


@pytest.mark.parametrize("mesh_shape", TEST_MESHES)
def test_sharded_lora_step_equals_single_device(base, single, mesh_shape):
  ref, ref_hist = single
  got, hist = run_lora(mesh_shape, base)  # the adapters after 3 steps carry the gradients
  loss_err = max(abs(float(a["loss"]) - float(b["loss"])) / abs(float(b["loss"])) for a, b in zip(hist, ref_hist))
  p_err = max_relative_error(got, ref)
  print(f"mesh {mesh_shape}: loss {loss_err:.1e}, adapters after 3 steps {p_err:.1e}")
  assert loss_err <= 1e-5 and p_err <= 1e-5


def test_adapters_on_a_base_of_other_shapes_is_one_line_error(base):
  other = abstract_params(dataclasses.replace(TINY, intermediate_size=2 * TINY.intermediate_size))[0]
  with pytest.raises(ValueError) as e:
    lora_lib.check_compatible(other, fresh_adapters(), "merge")
  msg = str(e.value)
  assert "\n" not in msg and "backbone/layers/mlp/" in msg and "trained on" in msg


@pytest.mark.parametrize("bad, field", [
    (dict(rank=0), "rank"), (dict(alpha=-1.0), "alpha"), (dict(dropout=1.0), "dropout"),
    (dict(targets=("q", "attn")), "targets"), (dict(targets=()), "targets"), (dict(base_dtype="fp8"), "base_dtype"),
    (dict(rnak=4), "rnak")])
def test_nonsense_lora_config_is_one_line(bad, field):
  with pytest.raises(ConfigError) as e:
    lora.lora_section(**bad)
  assert f"config.lora.{field}" in str(e.value) and "\n" not in str(e.value)


def test_lora_step_lowers_ahead_of_time_with_an_abstract_base():
  """The AOT path (`nextstep-jax aot`, `Objective.abstract_step`): the adapter state and the base as
  ShapeDtypeStructs carrying the rule table's shardings (tiny model, the (2, 2, 2) CPU mesh; lowering only)."""
  from nextstep_jax.data.pipeline import batch_shardings
  from nextstep_jax.train.config import TrainConfig
  from nextstep_jax.train.objective import StepContext
  mesh = sharding.mesh_from_shape((2, 2, 2))
  run = TrainConfig.from_config(train_cfg())
  tx, sched = make_optimizer(run)
  obj = lora.Lora()
  lcfg = dataclasses.replace(LCFG, base_dtype="int8")
  abstract, sh = state_shardings(TINY, tx, mesh, obj.trainable_init(TINY, lcfg))
  batch = batches(1)[0]
  bsh = batch_shardings({k: v.shape for k, v in batch.items()}, mesh)
  ctx = StepContext(cfg=TINY, run=run, section=lcfg, tx=tx, schedule=sched, state_shardings=sh,
                    batch_shardings=bsh, mesh=mesh, init_rng=jax.random.key(0))
  program = obj.abstract_step(ctx, abstract)
  flat_base = traverse_util.flatten_dict(program.bound)
  q = ("params", "backbone", "layers", "self_attn", "q_proj")
  assert flat_base[q + ("kernel",)].dtype == np.int8 and (q + ("kernel_scale",)) in flat_base
  assert set(traverse_util.flatten_dict(abstract.params)) == set(traverse_util.flatten_dict(fresh_adapters()))
  structs = sharding.abstract_sharded(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch), bsh)
  key = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype,
                             sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  text = program.lower(abstract, structs, key).as_text()
  assert "stablehlo" in text or "func.func" in text
