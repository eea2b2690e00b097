"""The demo's word tokenizer: one token per shapes-world word, byte fallback for anything else, and the byte
tokenizer's special ids (so the prompt format and the model's special embeddings are unchanged)."""
from transformers import AutoTokenizer

from nextstep_jax.data.shapes import held_out_prompts
from nextstep_jax.demo.text import WORD_VOCAB_SIZE, make_shapes_tokenizer
from nextstep_jax.tokens import SPECIAL_TOKENS, make_byte_tokenizer


def test_words_are_single_tokens_and_specials_match_the_byte_tokenizer(tmp_path):
  words = AutoTokenizer.from_pretrained(make_shapes_tokenizer(tmp_path / "words"))
  byte = AutoTokenizer.from_pretrained(make_byte_tokenizer(tmp_path / "bytes"))
  caption = "a red circle to the left of a blue square"
  ids = words(caption)["input_ids"]
  assert len(ids) == len(caption.split()) and all(i >= 268 for i in ids[1:]), ids  # "a" is the byte 97
  assert words.decode(ids) == caption
  for prompt in held_out_prompts(20, seed=3):  # every caption of the world: one token per word, exact round trip
    ids = words(prompt)["input_ids"]
    assert len(ids) == len(prompt.split()) and words.decode(ids) == prompt
  other = "Zebra 42!"  # outside the world: byte by byte, as the byte tokenizer
  assert words(other)["input_ids"] == byte(other)["input_ids"] == list(other.encode())
  for t in SPECIAL_TOKENS:
    assert words.convert_tokens_to_ids(t) == byte.convert_tokens_to_ids(t)
  assert len(words) <= WORD_VOCAB_SIZE
