"""The weighted mixture resumes across a change of the number of training processes (1 → 2 → 1) without
repeating or skipping a sample: the samples of the resumed run, counted one by one out of the packed batches,
are exactly those of one uninterrupted run. One source is a text dataset built in-process or
by Beam with 2 workers (marker `beam`)."""
import collections
import json

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from wds_fixtures import write_shards

from nextstep_jax import cli
from nextstep_jax.checkpoint import Checkpointer
from nextstep_jax.data import elastic
from nextstep_jax.data.builders import write_dataset
from nextstep_jax.data.config import default_data_config
from nextstep_jax.data.iterator import make_train_iterator
from nextstep_jax.tokens import load_tokenizer, make_byte_tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("data_beam")]
EOS, PH = 256, 263


@pytest.fixture(scope="module", params=[0, pytest.param(2, marks=pytest.mark.beam)], ids=["inproc", "beam2"])
def cfg(request, tmp_path_factory):
  """The mixture; its text source built in this process or by Beam with 2 workers (`--workers`)."""
  root = tmp_path_factory.mktemp("mix")
  docs = [(f"d{i}", {"text": f"doc {i} " + "y" * (5 * (i % 4))}, [], False) for i in range(24)]
  write_shards(root / "shards", {"text": docs})
  assert cli.main(["data", "build", "--kind", "wds", "--src", str(root / "shards" / "text"), "--task", "text",
                   "--workers", str(request.param), "--dst", str(root / "text")]) == 0

  def t2i():
    for i in range(48):
      t = np.zeros((4, 64), np.float32)
      t[:, 0] = 1000 + i  # every image token names its record
      yield i, dict(tokens=t, grid=np.array([2, 2], np.int32), caption=f"c{i}", meta="{}")
  c = default_data_config()
  c.sources = [dict(name="img", path=write_dataset("ns_latent_t2i", root / "t2i", t2i), weight=2.0, kind=""),
               dict(name="txt", path=str(root / "text"), weight=1.0, kind="")]
  c.update(tokenizer=make_byte_tokenizer(root / "tok"), seq_len=40, global_batch_size=2, read_threads=2,
           num_epochs=1, elastic_resume=True, drop_text_prob=0.0)
  return c


def _samples(batch, tok):
  """Sample identities in a packed batch: image records by their planted tag, texts by their words."""
  out = []
  for r in range(len(batch["input_ids"])):
    ids = batch["input_ids"][r][batch["attention_mask"][r] == 1]
    tpos = 0
    for piece in np.split(ids, np.flatnonzero(ids == EOS) + 1):
      if not len(piece):
        continue
      m = int((piece == PH).sum())
      out.append(f"img{int(batch['image_tokens'][r, tpos, 0])}" if m else tok.decode(piece[:-1]))
      tpos += m
  return out


def _take(it, n, tok):
  got = []
  for _ in range(n):
    got += _samples(next(it), tok)
  return got


def _drain(it, tok):
  got = []
  for batch in it:
    got += _samples(batch, tok)
  return got


def test_resume_1_to_2_to_1_processes_repeats_and_skips_nothing(cfg, tmp_path):
  tok = load_tokenizer(cfg.tokenizer)
  reference = collections.Counter(_drain(make_train_iterator(cfg, 0, 1), tok))
  assert sum(reference.values()) > 12 and max(reference.values()) == 1

  it = make_train_iterator(cfg, 0, 1)
  assert isinstance(it, elastic.ElasticIterator)
  seen = _take(it, 2, tok)
  ckpt = Checkpointer(tmp_path, save_every=1, async_save=False)  # the trainer's Orbax checkpointer, 1 of 1
  state = {"w": jnp.arange(3.0)}
  ckpt.save(2, state, it, force=True)
  ckpt.wait()
  assert (tmp_path / "checkpoints" / "2" / "data" / "process_0-of-1.json").is_file()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

  two = [make_train_iterator(cfg, r, 2) for r in range(2)]
  for it2 in two:  # each of the 2 new processes restores the 1-process checkpoint through Orbax
    ckpt.restore(2, abstract, it2)
  for it2 in two:
    seen += _take(it2, 3, tok)
  saved2 = {(r, 2): json.dumps(it2.get_state()) for r, it2 in enumerate(two)}
  # the processes consumed different amounts: some samples past the common position are already done
  assert elastic.resume_point([json.loads(saved2[(r, 2)]) for r in range(2)])["excluded"]

  back = make_train_iterator(cfg, 0, 1)
  elastic.restore_from_files(saved2, back)
  seen += _drain(back, tok)
  assert collections.Counter(seen) == reference

  # the same layout restores through Orbax exactly where the saved iterator was
  again = make_train_iterator(cfg, 0, 1)
  restored = ckpt.restore(2, abstract, again)
  np.testing.assert_array_equal(restored["w"], state["w"])
  ckpt.close()
  ref_it = make_train_iterator(cfg, 0, 1)
  _take(ref_it, 2, tok)
  assert _take(again, 2, tok) == _take(ref_it, 2, tok)
