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

from nextstep_jax.data.shapes import COLORS, KINDS, RELATIONS
from nextstep_jax.tokens import make_byte_tokenizer

WORD_VOCAB_SIZE = 336  # >= the tokenizer's 328 tokens (model embedding rows; a multiple of 16)


def shapes_words() -> list[str]:
  """Every word of the shapes world, as the byte-level pre-tokenizer sees it: "a" at the start, " word" after."""
  words = sorted({"a", *COLORS, *KINDS, *" ".join(RELATIONS).split()})
  return ["a"] + [" " + w for w in words]


def make_shapes_tokenizer(out_dir: str | os.PathLike, words: list[str] | None = None) -> str:
  """Writes the byte tokenizer with one extra merged token per word (and its prefixes) into `out_dir`."""
  from tokenizers import Tokenizer

  path = make_byte_tokenizer(out_dir, shapes_words() if words is None else words)
  size = Tokenizer.from_file(str(Path(path) / "tokenizer.json")).get_vocab_size()
  if size > WORD_VOCAB_SIZE:
    raise ValueError(f"{size} tokens do not fit WORD_VOCAB_SIZE={WORD_VOCAB_SIZE}")
  return path
