"""Preference data (data/preferences.py, apps/preference_pairs.py): pairs from a model's samples ranked by any
scorer, import of (prompt, chosen, rejected) files, the ns_prefs → DPO batch pipeline (layout, skipped records,
checkpointed position), the `data prefs` CLI and a DPO stage run through `train` (resume rebuilds the reference)."""
import json

import numpy as np
import pytest
from PIL import Image

from nextstep_jax.apps import preference_pairs as pp
from nextstep_jax.data.preferences import REJECTED, PrefSource, make_pref_iterator, write_prefs
from nextstep_jax.data.records import decode_image
from nextstep_jax.sampling.pipeline import Options
from nextstep_jax.tokens import load_tokenizer

SIZE = 16  # the fixture model: f2 VAE, 2×2 patches → 4×4 tokens
OPTS = Options(height=SIZE, width=SIZE, steps=4, cfg=2.0, positive_prompt=None, negative_prompt="", buckets=(64,))
TIE = "a prompt every sample scores the same on"


def brightness(image, prompt):
  """A user scorer (`tests.test_dpo_data:brightness`): mean pixel value; constant for the TIE prompt."""
  return 0.5 if prompt == TIE else float(np.asarray(image, np.float64).mean())


@pytest.fixture(scope="module")
def model_dir(fixtures_dir, tmp_path_factory):
  from nextstep_jax.convert.nextstep import convert_nextstep
  out = tmp_path_factory.mktemp("prefs") / "model"
  convert_nextstep(fixtures_dir, out)
  return out


def _records(path):
  src = PrefSource(path)
  return [src[i] for i in range(len(src))]


def _vae_tokens(model_dir, images):
  """Reference encoding straight from the VAE functions (not through the latent-cache encoder)."""
  from nextstep_jax.convert.vae import load_vae
  from nextstep_jax.images import to_float
  from nextstep_jax.models.flux_vae import encode_latents
  from nextstep_jax.models.latents import patchify
  vae_cfg, params = load_vae(model_dir)
  return np.asarray(patchify(encode_latents(params, vae_cfg, to_float(np.stack(images)), deterministic=True), 2))


def test_pairs_from_model_samples_are_best_vs_worst_of_any_scorer(model_dir, tmp_path):
  prompts = ["a red cube", TIE, "two small dogs on grass"]
  out, counts = pp.make_prefs_from_model(model_dir, prompts, tmp_path, brightness, OPTS,
                                         pp.PairSettings(k=3, margin=1e-6, prompts_per_call=2))
  recs = _records(out)
  assert counts["prompts"] == 3 and counts["no_margin"] == 1 and counts["pairs"] == len(recs) == 2
  assert [r["prompt"].decode() for r in recs] == [prompts[0], prompts[2]]
  for r in recs:
    chosen, rejected = decode_image(r["chosen"]), decode_image(r["rejected"])
    assert chosen.shape == rejected.shape == (SIZE, SIZE, 3)
    scores = json.loads(r["meta"])["scores"]
    assert len(scores) == 3
    # the stored images are the extremes of the K samples under the user's scorer
    assert brightness(chosen, "") == pytest.approx(max(scores)) == pytest.approx(float(r["chosen_score"]))
    assert brightness(rejected, "") == pytest.approx(min(scores)) == pytest.approx(float(r["rejected_score"]))
    assert max(scores) > min(scores)
    # tokens = the VAE encoding of the stored (decoded) images, on the shared grid
    np.testing.assert_allclose(np.stack([r["chosen_tokens"], r["rejected_tokens"]]),
                               _vae_tokens(model_dir, [chosen, rejected]), atol=2e-5)
    assert list(r["grid"]) == [4, 4] and r["chosen_tokens"].shape == (16, 64)
  with pytest.raises(ValueError, match="no prompt gave a pair"):
    pp.make_prefs_from_model(model_dir, [TIE], tmp_path / "none", brightness, OPTS, pp.PairSettings(k=2))


def test_choose_pair_and_shapes_scorer():
  assert pp.choose_pair([0.2, 0.9, 0.5], 0.5) == (1, 0)
  assert pp.choose_pair([0.2, 0.6, 0.5], 0.5) is None and pp.choose_pair([0.4, 0.4], 0.0) is None
  from nextstep_jax.data import shapes
  scene = shapes.sample_scene(np.random.default_rng(3), two_object_prob=1.0)
  right = shapes.render(scene, 64)
  assert pp.shapes_score(right, scene.caption) == 1.0
  assert pp.shapes_score(np.full_like(right, 240), scene.caption) < 0.5  # empty canvas
  assert pp.load_scorer("shapes") is pp.shapes_score
  assert pp.load_scorer("test_dpo_data:brightness") is brightness
  with pytest.raises(ValueError):
    pp.load_scorer("test_dpo_data:nothing_here")


def test_import_pairs_from_files(model_dir, tmp_path):
  rng = np.random.default_rng(0)
  imgs = [rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(3)]
  for i, im in enumerate(imgs):
    Image.fromarray(im).save(tmp_path / f"{i}.png")
  Image.fromarray(np.repeat(np.repeat(imgs[2], 2, 0), 2, 1)).save(tmp_path / "big.png")  # 32×32: fitted to 16×16
  lines = [{"prompt": "first", "chosen": "0.png", "rejected": "1.png"},
           {"prompt": "", "chosen": "0.png", "rejected": "1.png"},  # no prompt: skipped
           {"prompt": "second", "chosen": "2.png", "rejected": "missing.png"},  # unreadable: skipped
           {"prompt": "third", "chosen": "1.png", "rejected": "big.png"}]
  (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  out, counts = pp.import_prefs(tmp_path / "pairs.jsonl", tmp_path / "out", model_dir, resolution=SIZE,
                                buckets="fixed")
  assert counts == {"pairs": 2, "skipped/empty_caption": 1, "skipped/undecodable": 1}
  recs = _records(out)
  assert [r["prompt"].decode() for r in recs] == ["first", "third"]
  np.testing.assert_allclose(recs[0]["chosen_tokens"], _vae_tokens(model_dir, [imgs[0]])[0], atol=2e-5)
  np.testing.assert_allclose(recs[0]["rejected_tokens"], _vae_tokens(model_dir, [imgs[1]])[0], atol=2e-5)
  assert recs[1]["rejected_tokens"].shape == recs[1]["chosen_tokens"].shape == (16, 64)


def _write_pairs(tmp_path, n, bad=()):
  """n pairs with index-coded tokens (chosen i·1.0, rejected −i), grid 2×2 (4 tokens); `bad` indices get
  tokens that do not match their grid."""
  def gen():
    for i in range(n):
      m = 3 if i in bad else 4
      yield i, dict(prompt=f"prompt {i}" + " x" * (i % 3), chosen=b"", rejected=b"",
                    chosen_tokens=np.full((m, 64), i, np.float32), rejected_tokens=np.full((m, 64), -i, np.float32),
                    grid=np.asarray([2, 2], np.int32), chosen_score=np.float32(1), rejected_score=np.float32(0),
                    meta="{}")
  return write_prefs(tmp_path / "prefs", gen)


def _data_cfg(path, tokenizer, batch=4, seq_len=40):
  from nextstep_jax.data.config import default_data_config
  d = default_data_config()
  d.update(dict(sources=[dict(name="prefs", path=str(path), weight=1.0, kind="")], tokenizer=str(tokenizer),
                seq_len=seq_len, max_image_tokens=8, global_batch_size=batch, pack=False, drop_text_prob=0.0,
                read_threads=1))
  return d


def test_pipeline_batches_pairs_skips_bad_records_and_resumes(tmp_path):
  from nextstep_jax.tokens import make_byte_tokenizer
  tok_dir = make_byte_tokenizer(tmp_path / "tok")
  tok = load_tokenizer(tok_dir)
  path = _write_pairs(tmp_path, 10, bad=(3,))
  long_prompt = len(tok.t2i_training_sequence("prompt 10 x", 2, 2))
  it = make_pref_iterator(_data_cfg(path, tok_dir), 0, 1)
  seen = []
  for _ in range(3):  # 9 good records per epoch, 4 rows per batch
    b = next(it)
    assert set(b) == {"input_ids", "attention_mask", "positions", "labels", "image_tokens", REJECTED,
                      "image_loss_mask", "image_token_grid"}
    np.testing.assert_array_equal(b["image_token_grid"][:, :4], np.broadcast_to(
        [[0, 0, 2, 2], [0, 1, 2, 2], [1, 0, 2, 2], [1, 1, 2, 2]], (4, 4, 4)))  # the 2×2 images' (row, col, rows, cols)
    assert b[REJECTED].shape == b["image_tokens"].shape == (4, 8, 64) and b["input_ids"].shape == (4, 40)
    for r in range(4):
      i = int(b["image_tokens"][r, 0, 0])
      seen.append(i)
      ids = tok.t2i_training_sequence(f"prompt {i}" + " x" * (i % 3), 2, 2)
      np.testing.assert_array_equal(b["input_ids"][r, :len(ids)], ids)
      assert b["attention_mask"][r].sum() == len(ids) and (b["input_ids"][r, len(ids):] == tok.pad_id).all()
      np.testing.assert_array_equal(b["image_loss_mask"][r], [1, 1, 1, 1, 0, 0, 0, 0])
      np.testing.assert_array_equal(b["image_tokens"][r, :4], np.full((4, 64), i))
      np.testing.assert_array_equal(b[REJECTED][r, :4], np.full((4, 64), -i))
      assert not b[REJECTED][r, 4:].any() and not b["image_tokens"][r, 4:].any()
  assert sorted(seen[:9]) == [0, 1, 2, 4, 5, 6, 7, 8, 9]  # the first epoch: every good record once, shuffled
  assert it.stats()["skipped/bad_latents"] >= 1 and long_prompt < 40
  state = it.get_state()
  expect = [next(it) for _ in range(2)]
  it2 = make_pref_iterator(_data_cfg(path, tok_dir), 0, 1)
  it2.set_state(state)
  for want in expect:
    got = next(it2)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # rows too long for seq_len are skipped and counted, not truncated
  short = make_pref_iterator(_data_cfg(path, tok_dir, seq_len=len(tok.t2i_training_sequence("prompt 1 x", 2, 2))),
                             0, 1)
  for _ in range(3):
    next(short)
  assert short.stats()["skipped/too_long"] >= 1


def test_data_prefs_cli(model_dir, tmp_path):
  from nextstep_jax.cli import main
  (tmp_path / "prompts.txt").write_text("a red cube\n\ntwo small dogs on grass\n")
  argv = ["data", "prefs", "--model", str(model_dir), "--prompts", str(tmp_path / "prompts.txt"), "--dst",
          str(tmp_path / "out"), "--k", "2", "--scorer", "test_dpo_data:brightness", "--margin", "0", "--size",
          str(SIZE), "--steps", "3", "--cfg", "2", "--tokens", "sampled"]
  assert main(argv) == 0
  recs = _records(tmp_path / "out")
  assert len(recs) == 2 and json.loads(recs[0]["meta"])["tokens"] == "sampled"
  assert main(["data", "prefs", "--dst", str(tmp_path / "x"), "--model", str(model_dir)]) == 2  # no prompts given
