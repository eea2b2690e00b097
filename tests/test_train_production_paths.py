"""Training as the 14B stages run it: sharded over every test mesh AND accumulated over 2 micro-batches, on
batches with unequal image-token counts per row and partial image-loss masks (edit sources), gen_pos_embed on —
compared with one unsharded, un-accumulated step on the same batch; the same for the DPO step."""
import dataclasses

import jax
import numpy as np
import pytest

from nextstep_jax import sharding
from nextstep_jax.data.pipeline import batch_shardings
from nextstep_jax.models.image_grid import grid_slots
from nextstep_jax.train import dpo
from nextstep_jax.train.optimizer import make_optimizer
from nextstep_jax.train.state import init_state, state_shardings
from nextstep_jax.train.step import jit_train_step
from nextstep_jax.train.synthetic import synthetic_batch
from sharding_harness import TEST_MESHES, max_relative_error
from train_utils import TINY, perturbed, random_params, train_cfg

CFG = dataclasses.replace(TINY, use_gen_pos_embed=True)
B, L, T = 16, 40, 16
# per-row image grids: even rows (micro-batch 0 of 2, strided) hold far fewer tokens than odd rows
GRIDS = [(2, 2), (4, 4), (2, 4), (4, 4), (1, 2), (3, 4), (2, 2), (4, 4)] * 2
LOSS_MASK = [0.0 if r % 4 == 3 else 1.0 for r in range(B)]  # every 4th row is an edit source: no image loss


def ragged_batch(i: int, extra: dict | None = None) -> dict[str, np.ndarray]:
  """`synthetic_batch` with row r's image cut to GRIDS[r] (eoi/eos follow it, then padding) and LOSS_MASK."""
  b = synthetic_batch(CFG, i, B, L, T)
  for r, (gh, gw) in enumerate(GRIDS):
    n = gh * gw
    ph = np.flatnonzero(b["input_ids"][r] == CFG.image_placeholder_id)
    row = np.concatenate([b["input_ids"][r, :ph[0] + n], [CFG.eoi_id, CFG.eos_token_id]])
    b["input_ids"][r] = CFG.pad_token_id
    b["input_ids"][r, :len(row)] = row
    b["attention_mask"][r] = np.arange(L) < len(row)
    b["image_token_grid"][r] = 0
    b["image_token_grid"][r, :n] = grid_slots(gh, gw)
  b["labels"] = np.where(b["attention_mask"] > 0, b["input_ids"], -100).astype(np.int32)
  b["image_loss_mask"] = np.repeat(np.asarray(LOSS_MASK, np.float32)[:, None], T, 1)
  return dict(b, **(extra or {}))


def _run(mesh_shape, microbatches, params, make_step, batches, ref=None):
  tx, sched = make_optimizer(train_cfg())
  mesh = sharding.mesh_from_shape(mesh_shape)
  state = init_state(CFG, tx, mesh, jax.random.key(0), params=params)
  _, sh = state_shardings(CFG, tx, mesh)
  bsh = batch_shardings({k: v.shape for k, v in batches[0].items()}, mesh)
  hist = []
  with sharding.use_mesh(mesh):
    step, args = make_step(tx, sched, microbatches, sh, bsh, mesh, ref)
    for b in batches:
      state, m = step(state, *args, jax.device_put(b, bsh), jax.random.key(1))
      hist.append(jax.device_get(m))
  return jax.device_get(state.params), hist


def _train_step(tx, sched, mb, sh, bsh, mesh, ref):
  return jit_train_step(CFG, tx, sched, mb, sh, bsh, mesh), ()


DCFG = dpo.DpoConfig(beta=50.0, sft_weight=0.1, ref_dtype="float32")


def _dpo_step(tx, sched, mb, sh, bsh, mesh, ref):
  return dpo.jit_dpo_step(CFG, DCFG, tx, sched, mb, sh, bsh, mesh), (dpo.as_reference(
      jax.device_put(ref, sh.params), DCFG.ref_dtype, sh.params),)


def _pair_batch(i):
  rej = np.random.default_rng([i, 7]).standard_normal((B, T, CFG.token_dim)).astype(np.float32)
  return ragged_batch(i, {dpo.REJECTED: 0.5 * rej + 0.5})


def _compare(hist, ref_hist, params, ref_params, keys):
  for a, b in zip(hist, ref_hist):
    for k in keys:
      assert abs(float(a[k]) - float(b[k])) <= 1e-5 * max(abs(float(b[k])), 1e-3), (k, a[k], b[k])
  err = max_relative_error(params, ref_params)
  assert err <= 1e-5, err
  return err


@pytest.fixture(scope="module")
def train_reference():
  params = random_params(CFG)
  batches = [ragged_batch(i) for i in range(2)]
  return params, batches, _run((1, 1, 1), 1, params, _train_step, batches)


@pytest.mark.parametrize("mesh_shape", TEST_MESHES)
def test_sharded_accumulated_train_step_equals_single_device(train_reference, mesh_shape):
  params, batches, (ref_params, ref_hist) = train_reference
  n_img = float(ref_hist[0]["image_token_count"])
  assert n_img == sum(gh * gw for (gh, gw), m in zip(GRIDS, LOSS_MASK) if m)  # the mask and the ragged rows count
  got, hist = _run(mesh_shape, 2, params, _train_step, batches)
  err = _compare(hist, ref_hist, got, ref_params, ("loss", "text_loss", "image_loss", "grad_norm"))
  print(f"mesh {mesh_shape} × 2 micro-batches: params after 2 steps {err:.1e} (relative)")


@pytest.fixture(scope="module")
def dpo_reference():
  params = random_params(CFG)
  ref = perturbed(params, 3)
  batches = [_pair_batch(i) for i in range(2)]
  return params, ref, batches, _run((1, 1, 1), 1, params, _dpo_step, batches, ref)


@pytest.mark.parametrize("mesh_shape", TEST_MESHES)
def test_sharded_accumulated_dpo_step_equals_single_device(dpo_reference, mesh_shape):
  params, ref, batches, (ref_params, ref_hist) = dpo_reference
  got, hist = _run(mesh_shape, 2, params, _dpo_step, batches, ref)
  err = _compare(hist, ref_hist, got, ref_params, ("loss", "dpo_loss", "sft_loss", "grad_norm"))
  print(f"DPO mesh {mesh_shape} × 2 micro-batches: params after 2 steps {err:.1e} (relative)")
