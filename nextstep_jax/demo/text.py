"""The demo's tokenizer: the byte tokenizer plus one token per word of the shapes world.

`make_byte_tokenizer` (nextstep_jax.tokens) spells a caption byte by byte ("a red circle to the left of a blue
square" is 41 tokens); a model this small, trained for a few hundred steps, spends much of its capacity and
time composing bytes into words. This tokenizer is the same byte-level BPE with the same special ids (EOS 256,
reserved 257/258, `SPECIAL_TOKENS` at 259…267) and a few merges on top, so that every word of the shapes
world is one token (the caption above: 10 tokens) while any other text still encodes, byte by byte, as before.
The merged tokens (and the pieces the merges pass through) take ids 268…; `WORD_VOCAB_SIZE` covers them all.
"""
from __future__ import annotations

import os
from pathlib import Path

WORD_VOCAB_SIZE = 336  # >= the tokenizer's 328 tokens (model embedding rows; a multiple of 16)


def shapes_words() -> list[str]:
  """Every word of the shapes world, as the byte-level pre-tokenizer sees it: "a" at the start, " word" after."""
  from nextstep_jax.data.shapes import COLORS, KINDS, RELATIONS
  words = sorted({"a", *COLORS, *KINDS, *" ".join(RELATIONS).split()})
  return ["a"] + [" " + w for w in words]


def make_shapes_tokenizer(out_dir: str | os.PathLike, words: list[str] | None = None) -> str:
  """Writes the byte tokenizer with one extra merged token per word (and its prefixes) into `out_dir`."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  from nextstep_jax.tokens import (_BYTE_RESERVED, ADDITIONAL_SPECIAL_TOKENS, BYTE_EOS_TOKEN, PAD_TOKEN,
                                   SPECIAL_TOKENS, _bytes_to_unicode)
  b2u = _bytes_to_unicode()
  vocab = {ch: b for b, ch in b2u.items()}
  specials = (BYTE_EOS_TOKEN,) + _BYTE_RESERVED + SPECIAL_TOKENS
  vocab.update({t: 256 + i for i, t in enumerate(specials)})  # in the model vocab, so the added specials keep these ids
  merges = []
  for word in (shapes_words() if words is None else words):
    chars = [b2u[b] for b in word.encode()]
    piece = chars[0]
    for ch in chars[1:]:
      if piece + ch not in vocab:
        vocab[piece + ch] = len(vocab)
        merges.append((piece, ch))
      piece = piece + ch
  if len(vocab) > WORD_VOCAB_SIZE:
    raise ValueError(f"{len(vocab)} tokens do not fit WORD_VOCAB_SIZE={WORD_VOCAB_SIZE}")
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  for i, t in enumerate(specials):
    assert tok.token_to_id(t) == 256 + i, (t, tok.token_to_id(t))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=BYTE_EOS_TOKEN, pad_token=PAD_TOKEN,
                                 padding_side="left", model_max_length=4096, clean_up_tokenization_spaces=False)
  try:
    fast.add_special_tokens({"extra_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS)})
  except (TypeError, ValueError, KeyError):  # transformers < 5
    fast.add_special_tokens({"additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS)})
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  fast.save_pretrained(str(out))
  return str(out)
