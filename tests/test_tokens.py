"""Tokenizer, prompts and training sequences vs the official token ids (fixtures) and the spec, by hand."""
import json
import os

import numpy as np
import pytest

from nextstep_jax import tokens as T
from nextstep_jax.config import ModelConfig


@pytest.fixture(scope="module")
def byte_dir(tmp_path_factory):
  return T.make_byte_tokenizer(tmp_path_factory.mktemp("bytetok"))


@pytest.fixture(scope="module", params=["fixture", "byte"])
def tok(request, fixtures_dir, byte_dir):
  """Every id test runs with the fixture's own tokenizer and with the one `make_byte_tokenizer` writes."""
  return T.NextStepTokenizer(fixtures_dir if request.param == "fixture" else byte_dir)


def _meta(fixtures_dir):
  with open(os.path.join(fixtures_dir, "run_meta.json")) as f:
    return json.load(f)


def test_special_ids_match_fixture(tok, fixtures_dir):
  assert tok.special_token_ids == _meta(fixtures_dir)["special_token_ids"]
  assert (tok.eos_id, tok.pad_id, tok.image_area_id, tok.boi_id, tok.eoi_id, tok.image_placeholder_id) == (
      256, 259, 260, 261, 262, 263)
  assert tok.bos_id is None
  tok.check_model_config(ModelConfig())  # the tiny ModelConfig defaults are the fixture's ids


def test_byte_tokenizer_encodes_like_fixture(fixtures_dir, byte_dir):
  ref = T.NextStepTokenizer(fixtures_dir)
  ours = T.NextStepTokenizer(byte_dir)
  texts = ["a red cube", "Copy original image.", "héllo wörld ✓ 日本", "  two  spaces\nnew line\t",
           "<|image_area|>4*4<|begin_of_image|><|image_placeholder|><|end_of_image|>x<|endoftext|>"]
  for t in texts:
    assert ours.encode(t) == ref.encode(t), t
  assert ours.encode("héllo") == list("héllo".encode("utf-8"))  # one token per UTF-8 byte, id = byte value
  assert ours.vocab_size == ref.vocab_size == 268
  assert ours.decode(ours.encode(texts[2])) == texts[2]


def _assert_left_padded(rows, pad_id, ref_ids, ref_mask):
  ids, mask = T.left_pad(rows, pad_id, buckets=(ref_ids.shape[1],))
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(mask, ref_mask)


def test_backbone_prompts_exact(tok, fixtures_dir):
  ref = np.load(os.path.join(fixtures_dir, "backbone.npz"))
  rows = [tok.edit_prompt("<image>make it blue", 4, 4, 4, 4), tok.t2i_prompt("a cat", 4, 4)]
  _assert_left_padded(rows, tok.pad_id, ref["input_ids"], ref["attention_mask"])


def test_t2i_cfg_rows_exact(tok, fixtures_dir):
  ref = np.load(os.path.join(fixtures_dir, "sample.npz"))
  call = _meta(fixtures_dir)["sampling_calls"]["sample.npz"]
  h, w = (s // 4 for s in call["hw"])  # pipeline down factor 4 (VAE f2 × patch 2)
  rows = tok.t2i_cfg_rows(call["captions"], h, w, call["num_images_per_caption"], call["positive_prompt"],
                          call["negative_prompt"])
  assert len(rows) == 8
  _assert_left_padded(rows, tok.pad_id, ref["prompt_input_ids"], ref["prompt_attention_mask"])


def test_edit_cfg_rows_exact(tok, fixtures_dir):
  ref = np.load(os.path.join(fixtures_dir, "sample_edit.npz"))
  call = _meta(fixtures_dir)["sampling_calls"]["sample_edit.npz"]
  rows = tok.edit_cfg_rows(call["captions"], 4, 4, 4, 4, negative_prompt=call["negative_prompt"])
  _assert_left_padded(rows, tok.pad_id, ref["prompt_input_ids"], ref["prompt_attention_mask"])
  # cfg_img == 1: [cond; negative prompt only]
  two = tok.edit_cfg_rows(call["captions"], 4, 4, 4, 4, negative_prompt=call["negative_prompt"], image_cfg=False)
  assert two == [rows[0], rows[2]]


def test_training_sequences_match_loss_fixture(tok, fixtures_dir):
  ref = np.load(os.path.join(fixtures_dir, "loss.npz"))
  for caption, row, mask in zip(["a red cube", "blue sky over green hills"], ref["input_ids"], ref["attention_mask"]):
    assert tok.t2i_training_sequence(caption, 4, 4) == row[mask == 1].tolist()


def test_training_sequence_by_hand(byte_dir):
  tok = T.NextStepTokenizer(byte_dir)
  cap = [ord(c) for c in "a dog"]
  image = [260, ord("2"), ord("*"), ord("3"), 261] + [263] * 6 + [262]
  assert tok.t2i_training_sequence("a dog", 2, 3) == cap + image + [256]
  assert tok.t2i_training_sequence("a dog", 2, 3, drop_text=True) == image + cap + [256]
  assert tok.text_sequence("hi") == [104, 105, 256]
  src = [260, ord("1"), ord("*"), ord("2"), 261, 263, 263, 262]
  tgt = [260, ord("2"), ord("*"), ord("1"), 261, 263, 263, 262]
  instr = [ord(c) for c in "flip"]
  expected = {"full": (src + instr + tgt, [0, 1]), "tags_at_end": (instr + src + tgt, [0, 1]),
              "drop_image": (instr + tgt, [1]), "drop_text": (src + tgt, [0, 1]), "drop_both": (tgt, [1])}
  for layout, (body, images) in expected.items():
    assert tok.edit_training_sequence("flip", (1, 2), (2, 1), layout) == (body + [256], images), layout
  # prompt prefix for a 32x32 grid (512 px): multi-digit sizes are plain text
  assert tok.generation_prefix(32, 32) == [260, ord("3"), ord("2"), ord("*"), ord("3"), ord("2"), 261]


def test_edit_drop_probabilities():
  probs = T.EditDropProbs(tags_at_end=0.1, drop=0.2)
  rng = np.random.default_rng(0)
  n = 20000
  counts = {k: 0 for k in T.EDIT_LAYOUTS}
  for _ in range(n):
    counts[probs.choose(rng)] += 1
  expected = {"drop_image": 0.2 / 3, "drop_text": 0.2 / 3, "drop_both": 0.2 / 3, "tags_at_end": 0.8 * 0.1,
              "full": 0.8 * 0.9}
  for k, p in expected.items():
    assert abs(counts[k] / n - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-3, (k, counts[k] / n, p)
  assert T.EditDropProbs(0.0, 0.0).choose(rng) == "full"


def test_edit_caption_errors(byte_dir):
  tok = T.NextStepTokenizer(byte_dir)
  with pytest.raises(T.TokenizerError, match="has 0 <image> tags"):
    tok.edit_prompt("make it blue", 4, 4, 4, 4)
  with pytest.raises(T.TokenizerError, match="has 2 <image> tags"):
    tok.edit_prompt("<image>and<image>", 4, 4, 4, 4)
  with pytest.raises(T.TokenizerError, match="edit layout"):
    tok.edit_training_sequence("x", (1, 1), (1, 1), "sideways")


def test_left_pad_buckets():
  ids, mask = T.left_pad([[5, 6, 7], [8]], pad_id=0, buckets=(2, 4, 8))
  np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  assert T.left_pad([[1] * 5], 0, buckets=(8, 4, 16))[0].shape == (1, 8)  # smallest bucket >= longest row
  with pytest.raises(T.TokenizerError, match="prompt of 9 tokens exceeds the largest bucket/cache 8"):
    T.left_pad([[1] * 9], 0, buckets=(4, 8))


def test_check_model_config_names_mismatch(byte_dir):
  tok = T.NextStepTokenizer(byte_dir)
  with pytest.raises(T.TokenizerError, match=r"boi_id=151667 but the tokenizer has 261"):
    tok.check_model_config(ModelConfig(vocab_size=152064, boi_id=151667))
  with pytest.raises(T.TokenizerError, match="has 268 tokens but config.model.vocab_size=262"):
    tok.check_model_config(ModelConfig(vocab_size=262))


def test_missing_special_tokens_added_in_official_order(tmp_path):
  """A plain tokenizer (only <|endoftext|>) gets [PAD] + the 8 additional tokens appended in order."""
  from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {ch: b for b, ch in T._bytes_to_unicode().items()}
  raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
  PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>").save_pretrained(str(tmp_path))
  tok = T.NextStepTokenizer(tmp_path)
  expected = ["[PAD]", "<|image_area|>", "<|begin_of_image|>", "<|end_of_image|>", "<|image_placeholder|>",
              "<|begin_of_prompt_refinement|>", "<|end_of_prompt_refinement|>", "<|begin_of_thinking|>",
              "<|end_of_thinking|>"]
  assert [tok.special_token_ids[t] for t in expected] == list(range(257, 266))
  assert tok.t2i_prompt("a", 1, 1) == [97, 258, 49, 42, 49, 259]


def test_pickle_reloads(byte_dir):
  import pickle
  tok = T.NextStepTokenizer(byte_dir)
  again = pickle.loads(pickle.dumps(tok))
  assert again.t2i_prompt("x", 2, 2) == tok.t2i_prompt("x", 2, 2) == [120, 260, 50, 42, 50, 261]
