"""Mutation check for the blind spots of issue #25: apply each deliberate break to a scratch copy of the repo, run
the tests meant to catch it, and report which test failed first (a mutation no test catches is a blind spot).

  nice -n 10 python benchmarks/mutation_check.py [--only NAME ...]

Each mutation replaces one exact snippet in one file (the script stops if the snippet is gone: update it with
the code). Results go to stdout, one line per mutation: CAUGHT by <test id> / MISSED.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PP, OPTS = "tests/test_production_parity.py::", "tests/test_sampler_options.py::"
# (name, file, original snippet, broken snippet, test selectors)
MUTATIONS = [
    ("vae_decode_ignores_shift", "nextstep_jax/models/flux_vae.py",
     "z_BxhxwxC / cfg.scaling_factor + cfg.shift_factor,", "z_BxhxwxC / cfg.scaling_factor,",
     [PP + "test_vae_scale_and_shift_match_official", "tests/test_flux_vae.py::test_scaled_vae_parity"]),
    ("vae_encode_scale_backwards", "nextstep_jax/models/flux_vae.py",
     "return (z - cfg.shift_factor) * cfg.scaling_factor", "return (z - cfg.shift_factor) / cfg.scaling_factor",
     [PP + "test_vae_scale_and_shift_match_official", "tests/test_flux_vae.py::test_scaled_vae_parity"]),
    ("loss_ignores_image_loss_mask", "nextstep_jax/models/nextstep.py",
     'weight = (slot_valid & (batch["image_loss_mask"] > 0)).astype', "weight = (slot_valid).astype",
     [PP + "test_training_loss_partial_masks_unequal_counts"]),
    ("loss_count_ignores_image_loss_mask", "nextstep_jax/models/nextstep.py",
     'fm = jnp.sum(slot_valid & (batch["image_loss_mask"] > 0)) * cfg.fm_head_batch_mul',
     "fm = jnp.sum(slot_valid) * cfg.fm_head_batch_mul",
     [PP + "test_training_loss_partial_masks_unequal_counts"]),
    ("gen_pos_embed_by_column_only", "nextstep_jax/models/nextstep.py",
     "table[row * cfg.base_image_grid_size + col]", "table[col]",
     [PP + "test_head_condition_takes_row_times_base_plus_col",
      PP + "test_text_to_image_with_gen_pos_embed_first_row_matches_official"]),
    ("conversion_skips_a_shard", "nextstep_jax/convert/safetensors_io.py",
     "files = sorted({path / f for f in weight_map.values()})",
     "files = sorted({path / f for f in weight_map.values()})[:-1]",
     [PP + "test_sharded_release_round_trips_bit_for_bit"]),
    ("image_loader_swaps_rgb", "nextstep_jax/images.py",
     "return np.asarray(out, dtype=np.uint8)", "return np.asarray(out, dtype=np.uint8)[..., ::-1]",
     ["tests/test_cli.py::test_sample_editing", "tests/test_data_records.py::test_image_readers_keep_rgb_channel_order"]),
    ("micro_batches_normalised_locally", "nextstep_jax/train/step.py",
     "loss_grad(p, mb, n, uu, counts, *extra)", "loss_grad(p, mb, n, uu, loss_counts(cfg, mb), *extra)",
     ["tests/test_train_step.py::test_gradient_accumulation_equals_one_big_batch",
      "tests/test_train_production_paths.py::test_sharded_accumulated_train_step_equals_single_device"]),
    ("edit_cfg_img_terms_swapped", "nextstep_jax/sampling/flow.py",
     "return v[2] + cfg_img * (v[1] - v[2]) + cfg * (v[0] - v[1])",
     "return v[2] + cfg * (v[1] - v[2]) + cfg_img * (v[0] - v[1])",
     [PP + "test_editing_with_cfg_img_1_matches_official",
      "tests/test_sampling.py::test_editing_matches_official_pipeline"]),
    ("heun_corrector_at_wrong_time", "nextstep_jax/sampling/flow.py",
     "return x + 0.5 * (v1 + velocity(x_pred, t_next, j + 1)) * (t_next - t)",
     "return x + 0.5 * (v1 + velocity(x_pred, t, j + 1)) * (t_next - t)",
     [OPTS + "test_heun_on_a_linear_velocity_has_its_closed_form", OPTS + "test_flow_method_matches_numpy_loop"]),
    ("linear_cfg_schedule_rising", "nextstep_jax/sampling/flow.py",
     "return 1.0 + (cfg - 1.0) * (n - k) / n", "return 1.0 + (cfg - 1.0) * k / n",
     [OPTS + "test_cfg_schedules_per_token", PP + "test_linear_schedule_without_norm_matches_official"]),
    ("ema_without_warmup", "nextstep_jax/train/optimizer.py",
     "d = jnp.minimum(decay, (1.0 + state.count) / (10.0 + state.count))", "d = jnp.asarray(decay)",
     ["tests/test_production_options.py::test_params_ema_recomputed_by_hand"]),
    ("seed_ignored", "nextstep_jax/sampling/pipeline.py",
     "key = jax.random.key(opts.seed)", "key = jax.random.key(0)",
     [OPTS + "test_seed_changes_only_the_noise"]),
]


def run_one(name, rel, old, new, tests, scratch: Path) -> str:
  src = (ROOT / rel).read_text()
  if src.count(old) != 1:
    return f"{name}: snippet not found exactly once in {rel}; update MUTATIONS"
  target = scratch / rel
  target.write_text(src.replace(old, new))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(scratch))
  t0 = time.time()
  try:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", *tests],
                          cwd=scratch, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    failed = [line.split()[1] for line in out.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    verdict = f"CAUGHT by {failed[0]}" if proc.returncode != 0 and failed else (
        "MISSED (all selected tests passed)" if proc.returncode == 0 else f"rc={proc.returncode}: {out[-300:]!r}")
  finally:
    target.write_text(src)
  return f"{name:36s} {rel:40s} {verdict}  ({time.time() - t0:.0f} s)"


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--only", nargs="*", default=None, help="mutation names to run (default: all)")
  args = ap.parse_args()
  with tempfile.TemporaryDirectory(prefix="mutation_") as tmp:
    scratch = Path(tmp) / "repo"
    (Path(tmp) / "shared").symlink_to(ROOT.parent / "shared")  # tests read ../shared/fixtures
    shutil.copytree(ROOT, scratch, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc"))
    for m in MUTATIONS:
      if args.only and m[0] not in args.only:
        continue
      print(run_one(*m, scratch), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
