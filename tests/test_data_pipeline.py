"""Grain pipeline over latent / text datasets: determinism, resume, process shards, packing, exact sequences.

Records are planted so every image token says where it came from: token[:, 0] = record tag, token[:, 1] =
position inside its image, so batches can be checked without trusting the code under test.
"""
import json

import grain
import numpy as np
import pytest

from nextstep_jax.config import ConfigError
from nextstep_jax.data import pipeline
from nextstep_jax.data.builders import DatasetError, write_dataset
from nextstep_jax.data.config import default_data_config
from nextstep_jax.tokens import make_byte_tokenizer

EOS, PAD, AREA, BOI, EOI, PH = 256, 259, 260, 261, 262, 263
GRIDS = [(2, 2), (2, 4), (4, 2), (3, 3)]


def _tokens(tag, grid, rng):
  n = grid[0] * grid[1]
  t = rng.normal(size=(n, 64)).astype(np.float32)
  t[:, 0] = tag
  t[:, 1] = np.arange(n)
  return t


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  rng = np.random.default_rng(0)

  def t2i():
    for i in range(24):
      g = GRIDS[i % 4]
      yield i, dict(tokens=_tokens(i, g, rng), grid=np.array(g, np.int32), caption=f"r{i}", meta="{}")

  def edit():
    for i in range(10):
      g = GRIDS[i % 4]
      yield i, dict(src_tokens=_tokens(1000 + i, g, rng), src_grid=np.array(g, np.int32),
                    tgt_tokens=_tokens(2000 + i, g, rng), tgt_grid=np.array(g, np.int32), instruction=f"e{i}",
                    meta="{}")

  def text():
    for i in range(10):
      yield i, dict(text=f"doc {i} " + "x" * (i % 5), meta="{}")

  def known():
    tok = np.arange(4 * 64, dtype=np.float32).reshape(4, 64) / 100.0
    yield 0, dict(tokens=tok, grid=np.array([2, 2], np.int32), caption="a red cube", meta="{}")

  return dict(tokenizer=make_byte_tokenizer(root / "tok"), t2i=write_dataset("ns_latent_t2i", root / "t2i", t2i),
              edit=write_dataset("ns_latent_edit", root / "edit", edit),
              text=write_dataset("ns_text", root / "text", text),
              known=write_dataset("ns_latent_t2i", root / "known", known))


def _cfg(data, sources=("t2i",), **kw):
  c = default_data_config()
  c.sources = [dict(name=s, path=data[s], weight=1.0, kind="") for s in sources]
  c.tokenizer = data["tokenizer"]
  c.seq_len, c.global_batch_size, c.read_threads = 48, 4, 2
  c.update(kw)
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


MIX = ("t2i", "edit", "text")


def test_same_seed_same_batches(data):
  cfg = _cfg(data, MIX, drop_text_prob=0.5)
  a = _take(pipeline.make_iterator(cfg, 0, 1), 6)
  _assert_same(a, _take(pipeline.make_iterator(cfg, 0, 1), 6))
  cfg.seed = 1
  c = _take(pipeline.make_iterator(cfg, 0, 1), 6)
  assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_resume_from_state_matches_uninterrupted(data):
  cfg = _cfg(data, MIX, drop_text_prob=0.5)
  full = _take(pipeline.make_iterator(cfg, 0, 1), 9)
  for k in (1, 3, 4):
    it = pipeline.make_iterator(cfg, 0, 1)
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # what the Orbax handler writes
    fresh = pipeline.make_iterator(cfg, 0, 1)
    fresh.set_state(state)
    _assert_same(_take(fresh, 9 - k), full[k:])


def test_resume_through_orbax_checkpoint_manager(data, tmp_path):
  import orbax.checkpoint as ocp

  cfg = _cfg(data, MIX, drop_text_prob=0.5)
  full = _take(pipeline.make_iterator(cfg, 0, 1), 5)
  it = pipeline.make_iterator(cfg, 0, 1)
  _take(it, 2)
  train_state = {"w": np.arange(3.0)}
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state", "data")) as mngr:
    mngr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state),
                                         data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  fresh = pipeline.make_iterator(cfg, 0, 1)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state", "data")) as mngr:
    restored = mngr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(train_state),
                                                       data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(restored["state"]["w"], train_state["w"])
  _assert_same(_take(fresh, 3), full[2:])


def _image_tags(batch):
  """Record tag (token[:, 0]) of every image with a loss, read at its first token (token[:, 1] == 0)."""
  first = (batch["image_loss_mask"] == 1) & (batch["image_tokens"][..., 1] == 0)
  return batch["image_tokens"][..., 0][first]


def test_process_shards_disjoint_and_covering(data):
  cfg = _cfg(data, num_epochs=1)
  seen = []
  for p in range(4):
    tags = set()
    for batch in pipeline.make_iterator(cfg, p, 4):
      assert batch["input_ids"].shape == (1, 48)  # global batch 4 over 4 processes
      tags |= set(_image_tags(batch).astype(int).tolist())
    seen.append(tags)
  for p in range(4):
    for q in range(p):
      assert not seen[p] & seen[q], (p, q)
  assert set().union(*seen) == set(range(24))
  assert sorted(len(s) for s in seen) == [6, 6, 6, 6]


def test_every_epoch_covers_the_data_once(data):
  cfg = _cfg(data, num_epochs=2)
  tags = np.concatenate([_image_tags(b) for b in pipeline.make_iterator(cfg, 0, 1)])
  np.testing.assert_array_equal(np.sort(tags), np.repeat(np.arange(24), 2))


def test_known_caption_and_image_give_spec_sequence(data):
  """Spec §1.5: caption + <|image_area|>h*w + boi + h·w placeholders + eoi + eos (byte tokenizer: id = byte)."""
  cap = [97, 32, 114, 101, 100, 32, 99, 117, 98, 101]  # "a red cube"
  image = [AREA, 50, 42, 50, BOI, PH, PH, PH, PH, EOI]  # "2*2"
  tokens = np.arange(4 * 64, dtype=np.float32).reshape(4, 64) / 100.0
  for drop, expected in ((0.0, cap + image + [EOS]), (1.0, image + cap + [EOS])):
    cfg = _cfg(data, ("known",), drop_text_prob=drop, global_batch_size=1, seq_len=32, num_epochs=1, pack=False)
    (batch,) = list(pipeline.make_iterator(cfg, 0, 1))
    n = len(expected)
    np.testing.assert_array_equal(batch["input_ids"][0], expected + [PAD] * (32 - n))
    np.testing.assert_array_equal(batch["attention_mask"][0], [1] * n + [0] * (32 - n))
    np.testing.assert_array_equal(batch["labels"][0], expected + [-100] * (32 - n))
    np.testing.assert_array_equal(batch["positions"][0], np.arange(32))
    np.testing.assert_array_equal(batch["image_tokens"][0, :4], tokens)
    assert not batch["image_tokens"][0, 4:].any()
    np.testing.assert_array_equal(batch["image_loss_mask"][0], [1.0] * 4 + [0.0] * 28)
    np.testing.assert_array_equal(batch["image_token_grid"][0, :4], [[0, 0, 2, 2], [0, 1, 2, 2], [1, 0, 2, 2],
                                                                     [1, 1, 2, 2]])  # (row, col, rows, cols)
    assert not batch["image_token_grid"][0, 4:].any()
    assert {k: v.dtype for k, v in batch.items()} == dict(
        input_ids=np.int32, attention_mask=np.int32, positions=np.int32, labels=np.int32, image_tokens=np.float32,
        image_loss_mask=np.float32, image_token_grid=np.int32)


def _samples_of_row(ids):
  """Splits a packed row into its samples (each ends with eos) and checks every image block is whole."""
  real = ids[ids != PAD]
  assert len(real) and real[-1] == EOS, "a row must end with a complete sample"
  assert (ids[len(real):] == PAD).all(), "padding only at the end"
  blocks = []
  j = 0
  while j < len(real):
    if real[j] == AREA:
      k = j + 1
      while real[k] != BOI:
        k += 1
      h, w = (int(x) for x in bytes(real[j + 1:k].tolist()).decode().split("*"))
      assert (real[k + 1:k + 1 + h * w] == PH).all() and real[k + 1 + h * w] == EOI, "image block split or wrong"
      blocks.append((h, w))
      j = k + 2 + h * w
    else:
      assert real[j] != PH, "placeholder outside an image block"
      j += 1
  return blocks


def test_packing_never_splits_an_image(data):
  cfg = _cfg(data, MIX, drop_text_prob=0.3)
  rows = samples_per_row = 0
  for batch in _take(pipeline.make_iterator(cfg, 0, 1), 8):
    for r in range(4):
      blocks = _samples_of_row(batch["input_ids"][r])
      toks = batch["image_tokens"][r]
      n = int((batch["input_ids"][r] == PH).sum())
      assert n == sum(h * w for h, w in blocks)
      assert not toks[n:].any() and not batch["image_loss_mask"][r, n:].any()
      assert not batch["image_token_grid"][r, n:].any()
      pos = 0
      for h, w in blocks:  # each block's tokens are one whole image, in order
        size = h * w
        rr, cc = np.divmod(np.arange(size), w)  # every image's grid restarts at (0, 0)
        np.testing.assert_array_equal(batch["image_token_grid"][r, pos:pos + size],
                                      np.stack([rr, cc, np.full(size, h), np.full(size, w)], -1))
        tag = toks[pos:pos + size, 0]
        assert (tag == tag[0]).all()
        np.testing.assert_array_equal(toks[pos:pos + size, 1], np.arange(size))
        expected_loss = 0.0 if 1000 <= tag[0] < 2000 else 1.0  # editing: only the target image has loss
        assert (batch["image_loss_mask"][r, pos:pos + size] == expected_loss).all()
        pos += size
      rows += 1
      samples_per_row += int((batch["input_ids"][r] == EOS).sum())
  assert samples_per_row > rows  # rows really hold several samples


def test_positions_reset_per_sample(data):
  cfg = _cfg(data, reset_positions_per_sample=True)
  batch = next(pipeline.make_iterator(cfg, 0, 1))
  for r in range(4):
    ids, pos = batch["input_ids"][r], batch["positions"][r]
    starts = np.concatenate([[0], np.flatnonzero(ids == EOS)[:-1] + 1])
    for s in starts:
      assert pos[s] == 0
    assert (np.diff(pos)[ids[1:] != PAD] <= 1).all()
  assert (batch["positions"] != np.arange(48)).any()


def test_mixture_weights(data):
  cfg = _cfg(data, ("t2i", "text"), pack=False, global_batch_size=8)
  cfg.sources[0]["weight"], cfg.sources[1]["weight"] = 3.0, 1.0
  n_img = n_all = 0
  for batch in _take(pipeline.make_iterator(cfg, 0, 1), 25):
    n_img += int((batch["image_loss_mask"].sum(1) > 0).sum())
    n_all += 8
  assert abs(n_img / n_all - 0.75) < 0.05


def test_too_long_samples_are_dropped_and_counted(data, caplog):
  cfg = _cfg(data, seq_len=16, num_epochs=1)  # 2x2 (16 tokens with "rN" + eos = 15..16) fit, bigger ones do not
  it = pipeline.make_iterator(cfg, 0, 1)
  tags = np.concatenate([_image_tags(b) for b in it])
  np.testing.assert_array_equal(np.sort(tags), np.arange(0, 24, 4))
  assert it.stats()["skipped/too_long"] == 18 and it.stats()["skipped_total"] == 18
  assert "skipping record t2i[" in caplog.text
  cfg.on_too_long = "error"
  with pytest.raises(ValueError, match="sample is too long"):
    list(pipeline.make_iterator(cfg, 0, 1))


def test_to_global_shards_batch_axis(data):
  import jax

  from nextstep_jax.sharding import mesh_from_shape
  mesh = mesh_from_shape((2, 2, 2))
  cfg = _cfg(data, global_batch_size=8)
  batch = next(pipeline.make_iterator(cfg, 0, 1))
  out = pipeline.to_global(batch, mesh)
  shapes = pipeline.batch_shapes(cfg)
  for k, v in batch.items():
    assert out[k].shape == v.shape == shapes[k].shape and out[k].dtype == shapes[k].dtype
    assert out[k].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(out[k]), v)


def test_config_errors(data, tmp_path):
  from nextstep_jax.data.config import validate_data_config
  with pytest.raises(ConfigError, match=r"unknown field\(s\) \['seqlen'\]"):
    validate_data_config(dict(_cfg(data).to_dict(), seqlen=3))
  with pytest.raises(ConfigError, match="max_image_tokens=64 exceeds seq_len=48"):
    validate_data_config(_cfg(data, max_image_tokens=64))
  with pytest.raises(ConfigError, match="encode_on_the_fly=True needs buckets='fixed'"):
    validate_data_config(_cfg(data, encode_on_the_fly=True))
  with pytest.raises(ConfigError, match="global_batch_size=4 is not divisible by the 3 processes"):
    pipeline.make_iterator(_cfg(data), 0, 3)
  cfg = _cfg(data)
  cfg.sources[0]["kind"] = "edit"
  with pytest.raises(DatasetError, match="is a t2i dataset"):
    pipeline.make_iterator(cfg, 0, 1)
  pixels = write_dataset("ns_shapes", tmp_path, lambda: iter([(0, dict(image=b"", caption="c", meta="{}"))]))
  cfg = _cfg(data)
  cfg.sources[0]["path"] = pixels
  with pytest.raises(DatasetError, match="stores raw images; cache latents first"):
    pipeline.make_iterator(cfg, 0, 1)


@pytest.mark.slow
def test_worker_processes_deterministic_and_resumable(data):
  """num_workers=2 (spawned processes): a restored state continues exactly like the uninterrupted run."""
  cfg = _cfg(data, MIX, drop_text_prob=0.5, num_workers=2)
  it = pipeline.make_iterator(cfg, 0, 1)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  tail = _take(it, 3)
  it.close()
  fresh = pipeline.make_iterator(cfg, 0, 1)
  fresh.set_state(state)
  _assert_same(_take(fresh, 3), tail)
  fresh.close()
