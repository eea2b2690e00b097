"""Text side of NextStep-1: tokenizer + special tokens, inference prompts, CFG rows, training sequences.

The official special tokens (`SPECIAL_TOKENS`, spec §1.4) live here and only here. With the real Qwen2.5
vocabulary they get ids 151665… in this order; with the byte tokenizer of the tiny fixture (`make_byte_tokenizer`)
259…267.

Prompt format (spec §1.5, official Aug-2025 `NextStepPipeline`, reproduced id for id — see tests/test_tokens.py):

  t2i row     tok(caption [+ " " + positive]) + tok("<|image_area|>{h}*{w}") + [boi]
  edit row    tok(caption with "<image>" → "<|image_area|>{h}*{w}<|begin_of_image|>" + h·w×placeholder + eoi) + prefix
  CFG t2i     [cond rows (each caption repeated num_images_per_prompt times, consecutively); negative-prompt rows]
  CFG edit    [cond; image block + negative prompt; negative prompt only]

`tok(...)` keeps a BOS if the tokenizer adds one (Qwen2.5 adds none); the generation prefix never has one.
h, w are token-grid sizes (pixels / 16 for the f8 VAE with 2×2 patches).

Training sequences (Feb-2026 official data format, spec §1.5), `I(h,w)` = `<|image_area|>h*w` + boi + h·w×placeholder
+ eoi:
  t2i         caption + I(h,w) + eos         (drop_text: I(h,w) + caption + eos — image generated unconditionally)
  edit        I(src) + instruction + I(tgt) + eos; only the last image gets the flow-matching loss; random drops
              (tags moved to the end: instruction + I(src) + I(tgt); drop image / text / both) train the CFG branches
  text        text + eos
"""
from __future__ import annotations

import dataclasses
import functools
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

IMAGE_TAG = "<image>"  # the literal tag an editing caption carries where the source image goes
PAD_TOKEN = "[PAD]"
IMAGE_AREA_TOKEN = "<|image_area|>"
BOI_TOKEN = "<|begin_of_image|>"
EOI_TOKEN = "<|end_of_image|>"
IMAGE_PLACEHOLDER_TOKEN = "<|image_placeholder|>"
# Official order (tokenization_nextstep.py): pad first, then the additional special tokens.
ADDITIONAL_SPECIAL_TOKENS: tuple[str, ...] = (
    IMAGE_AREA_TOKEN,
    BOI_TOKEN,
    EOI_TOKEN,
    IMAGE_PLACEHOLDER_TOKEN,
    "<|begin_of_prompt_refinement|>",
    "<|end_of_prompt_refinement|>",
    "<|begin_of_thinking|>",
    "<|end_of_thinking|>",
)
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN,) + ADDITIONAL_SPECIAL_TOKENS
# attribute name on NextStepTokenizer → token
SPECIAL_TOKEN_NAMES: dict[str, str] = {
    "pad_id": PAD_TOKEN,
    "image_area_id": IMAGE_AREA_TOKEN,
    "boi_id": BOI_TOKEN,
    "eoi_id": EOI_TOKEN,
    "image_placeholder_id": IMAGE_PLACEHOLDER_TOKEN,
    "bopr_id": "<|begin_of_prompt_refinement|>",
    "eopr_id": "<|end_of_prompt_refinement|>",
    "bot_id": "<|begin_of_thinking|>",
    "eot_id": "<|end_of_thinking|>",
}
# NextStepTokenizer attribute → ModelConfig field that must agree
_MODEL_CONFIG_FIELDS = {"eos_id": "eos_token_id", "pad_id": "pad_token_id", "image_area_id": "image_area_id",
                        "boi_id": "boi_id", "eoi_id": "eoi_id", "image_placeholder_id": "image_placeholder_id"}
IGNORE_INDEX = -100
DEFAULT_EDIT_NEGATIVE_PROMPT = "Copy original image."
DEFAULT_PROMPT_BUCKETS: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)

BYTE_EOS_TOKEN = "<|endoftext|>"
_BYTE_RESERVED = ("<|reserved_0|>", "<|reserved_1|>")


class TokenizerError(ValueError):
  """The tokenizer does not match the model, or a prompt is malformed."""


# ----------------------------------------------------------------------------------------------- tokenizer


class NextStepTokenizer:
  """A Hugging Face tokenizer (loaded from a local directory, never downloaded) + the NextStep special tokens.

  Picklable (reloads from `path` in a new process), so Grain worker processes can hold one.
  Attributes: `eos_id`, `bos_id` (None for Qwen2.5), `pad_id`, `image_area_id`, `boi_id`, `eoi_id`,
  `image_placeholder_id`, `bopr_id`, `eopr_id`, `bot_id`, `eot_id`, `vocab_size` (= len(tokenizer)).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = str(path)
    self._tok = None
    self._setup()

  # -- loading
  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.path = state["path"]
    self._tok = None
    self._setup()

  @property
  def hf(self):
    """The underlying `transformers` tokenizer."""
    return self._tok

  def _setup(self) -> None:
    from transformers import AutoTokenizer
    if not Path(self.path).is_dir():
      raise FileNotFoundError(f"tokenizer directory {self.path} does not exist; pass a local directory holding "
                              f"tokenizer.json (e.g. from `make_byte_tokenizer` or a converted model)")
    tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
    _add_missing_special_tokens(tok)
    self._tok = tok
    for attr, token in SPECIAL_TOKEN_NAMES.items():
      setattr(self, attr, int(tok.convert_tokens_to_ids(token)))
    if tok.eos_token_id is None:
      raise TokenizerError(f"tokenizer at {self.path} defines no eos_token; set one in tokenizer_config.json")
    self.eos_id = int(tok.eos_token_id)
    self.bos_id = None if tok.bos_token_id is None else int(tok.bos_token_id)
    probe = tok.encode("a", add_special_tokens=True)
    plain = tok.encode("a", add_special_tokens=False)
    # what add_special_tokens=True adds around the text (a BOS in front; the pipeline disables a trailing EOS)
    self._lead = list(probe[:probe.index(plain[0])]) if plain and plain[0] in probe else []
    self.vocab_size = len(tok)

  # -- basic encoding
  def encode(self, text: str) -> list[int]:
    """`text` tokenized with add_special_tokens=True as the official pipeline does (BOS kept, no EOS)."""
    return self._lead + self.encode_plain(text)

  def encode_plain(self, text: str) -> list[int]:
    """`text` without any added special tokens (special-token strings inside `text` still map to their ids).

    Fast tokenizers are called through their Rust backend (read-only, safe from several reader threads; the
    transformers wrapper may reconfigure truncation state per call)."""
    backend = getattr(self._tok, "backend_tokenizer", None)
    if backend is not None:
      return list(backend.encode(text, add_special_tokens=False).ids)
    return list(self._tok.encode(text, add_special_tokens=False))

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  @property
  def special_token_ids(self) -> dict[str, int]:
    """{token string: id} for `SPECIAL_TOKENS` plus the EOS token."""
    out = {t: getattr(self, a) for a, t in SPECIAL_TOKEN_NAMES.items()}
    out[self._tok.eos_token] = self.eos_id
    return out

  def check_model_config(self, cfg: Any) -> "NextStepTokenizer":
    """Raises TokenizerError naming every special id that differs from `cfg` (a ModelConfig or dict)."""
    get = (lambda k: cfg[k]) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k))
    bad = [f"{field}={get(field)} but the tokenizer has {getattr(self, attr)}"
           for attr, field in _MODEL_CONFIG_FIELDS.items() if int(get(field)) != getattr(self, attr)]
    if bad:
      raise TokenizerError(f"tokenizer {self.path} does not match the model config: {'; '.join(bad)}; "
                           f"use the tokenizer the model was trained with or fix config.model")
    vocab = int(get("vocab_size"))
    if self.vocab_size > vocab:
      raise TokenizerError(f"tokenizer {self.path} has {self.vocab_size} tokens but config.model.vocab_size={vocab}; "
                           f"the embedding table must cover every token id")
    return self

  # -- pieces
  def area_ids(self, h_tok: int, w_tok: int) -> list[int]:
    """`<|image_area|>{h}*{w}` (no BOS): the image-area marker and the token-grid size as text."""
    _check_grid(h_tok, w_tok)
    return self.encode_plain(f"{IMAGE_AREA_TOKEN}{h_tok}*{w_tok}")

  def image_block(self, h_tok: int, w_tok: int) -> list[int]:
    """area_ids + boi + h·w × placeholder + eoi (an image the LM reads)."""
    return self.area_ids(h_tok, w_tok) + [self.boi_id] + [self.image_placeholder_id] * (h_tok * w_tok) + [self.eoi_id]

  def image_block_str(self, h_tok: int, w_tok: int) -> str:
    """The string form of `image_block` (what the official `_image_str` substitutes for `<image>`)."""
    return (f"{IMAGE_AREA_TOKEN}{h_tok}*{w_tok}{BOI_TOKEN}" + IMAGE_PLACEHOLDER_TOKEN * (h_tok * w_tok) + EOI_TOKEN)

  def generation_prefix(self, h_tok: int, w_tok: int) -> list[int]:
    """`<|image_area|>{h}*{w}<|begin_of_image|>`: appended to every prompt; the model then emits h·w tokens."""
    return self.area_ids(h_tok, w_tok) + [self.boi_id]

  # -- inference prompts
  def t2i_prompt(self, caption: str, h_tok: int, w_tok: int, positive_prompt: str | None = None) -> list[int]:
    """Text-to-image prompt ids: caption [+ " " + positive] then the generation prefix."""
    if positive_prompt:
      caption = f"{caption} {positive_prompt}"
    return self.encode(caption) + self.generation_prefix(h_tok, w_tok)

  def expand_image_tag(self, caption: str, src_h_tok: int, src_w_tok: int) -> str:
    """Replaces the single `<image>` of an editing caption by the source image block (string form)."""
    n = caption.count(IMAGE_TAG)
    if n != 1:
      raise TokenizerError(f"editing caption {caption!r} has {n} {IMAGE_TAG} tags; it needs exactly one, where the "
                           f"source image goes (e.g. '{IMAGE_TAG}make it blue')")
    return caption.replace(IMAGE_TAG, self.image_block_str(src_h_tok, src_w_tok))

  def edit_prompt(self, caption: str, src_h_tok: int, src_w_tok: int, out_h_tok: int, out_w_tok: int) -> list[int]:
    """Editing prompt ids: caption with `<image>` expanded to the source image block, then the output prefix."""
    return self.encode(self.expand_image_tag(caption, src_h_tok, src_w_tok)) + self.generation_prefix(out_h_tok,
                                                                                                     out_w_tok)

  def t2i_cfg_rows(self, captions: str | Sequence[str], h_tok: int, w_tok: int, num_images_per_prompt: int = 1,
                   positive_prompt: str | None = None, negative_prompt: str | None = None,
                   cfg: bool = True) -> list[list[int]]:
    """Rows of a text-to-image batch: each caption repeated `num_images_per_prompt` times consecutively, then
    (when `cfg`) one negative-prompt row per image row (the positive prompt is not added to those)."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    cond = [self.t2i_prompt(c, h_tok, w_tok, positive_prompt) for c in captions for _ in range(num_images_per_prompt)]
    if not cfg:
      return cond
    uncond = self.encode(negative_prompt or "") + self.generation_prefix(h_tok, w_tok)
    return cond + [list(uncond) for _ in cond]

  def edit_cfg_rows(self, caption: str, src_h_tok: int, src_w_tok: int, out_h_tok: int, out_w_tok: int,
                    negative_prompt: str | None = DEFAULT_EDIT_NEGATIVE_PROMPT, num_images_per_prompt: int = 1,
                    cfg: bool = True, image_cfg: bool = True) -> list[list[int]]:
    """Rows of an editing batch (image rows repeated `num_images_per_prompt` times per branch):
    [cond: image + instruction; image-uncond: image + negative prompt; text-uncond: negative prompt only].
    `image_cfg=False` (cfg_img == 1) gives [cond; negative prompt only]; `cfg=False` gives [cond]."""
    n = num_images_per_prompt
    prefix = self.generation_prefix(out_h_tok, out_w_tok)
    rows = [self.edit_prompt(caption, src_h_tok, src_w_tok, out_h_tok, out_w_tok)] * n
    neg = negative_prompt or ""
    if cfg and image_cfg:
      rows = rows + [self.encode(self.image_block_str(src_h_tok, src_w_tok) + neg) + prefix] * n
    if cfg:
      rows = rows + [self.encode(neg) + prefix] * n
    return [list(r) for r in rows]

  # -- training sequences
  def text_sequence(self, text: str) -> list[int]:
    """Plain-text training sequence: text + eos."""
    return self.encode(text) + [self.eos_id]

  def t2i_training_sequence(self, caption: str, h_tok: int, w_tok: int, drop_text: bool = False) -> list[int]:
    """caption + image block + eos; with `drop_text` the image block comes first and the caption after it."""
    image = self.image_block(h_tok, w_tok)
    text = self.encode_plain(caption)
    body = image + text if drop_text else text + image
    return self._lead + body + [self.eos_id]

  def edit_training_sequence(self, instruction: str, src_hw: tuple[int, int], tgt_hw: tuple[int, int],
                             layout: str = "full") -> tuple[list[int], list[int]]:
    """Editing sequence `I(src) instruction I(tgt) eos` in one of the `EDIT_LAYOUTS`.

    Returns (ids, images): `images` lists which images appear, in order (0 = source, 1 = target); the target
    is always last and is the only one that gets the image loss.
    """
    if layout not in EDIT_LAYOUTS:
      raise TokenizerError(f"edit layout {layout!r} is not one of {EDIT_LAYOUTS}")
    src, tgt = self.image_block(*src_hw), self.image_block(*tgt_hw)
    text = self.encode_plain(instruction)
    body, images = {
        "full": (src + text + tgt, [0, 1]),
        "tags_at_end": (text + src + tgt, [0, 1]),
        "drop_image": (text + tgt, [1]),
        "drop_text": (src + tgt, [0, 1]),
        "drop_both": (tgt, [1]),
    }[layout]
    return self._lead + body + [self.eos_id], images


EDIT_LAYOUTS = ("full", "tags_at_end", "drop_image", "drop_text", "drop_both")


@dataclasses.dataclass(frozen=True)
class EditDropProbs:
  """Random layout choice of an editing sample (official: 10% tags moved to the end; 20% of two-image samples
  drop the source image, the text or both — split equally)."""
  tags_at_end: float = 0.1
  drop: float = 0.2

  def choose(self, rng: np.random.Generator) -> str:
    u = rng.random()
    if u < self.drop:
      return ("drop_image", "drop_text", "drop_both")[min(int(u / self.drop * 3), 2)]
    if rng.random() < self.tags_at_end:
      return "tags_at_end"
    return "full"


def _check_grid(h_tok: int, w_tok: int) -> None:
  if not (int(h_tok) == h_tok and int(w_tok) == w_tok and h_tok > 0 and w_tok > 0):
    raise TokenizerError(f"token grid {h_tok}x{w_tok} must be two positive integers (image pixels / 16)")


def _add_missing_special_tokens(tok) -> None:
  """Adds `[PAD]` and the additional NextStep tokens (official order) to a tokenizer that lacks them."""
  vocab = tok.get_vocab()
  if PAD_TOKEN not in vocab:
    tok.add_special_tokens({"pad_token": PAD_TOKEN})
  elif tok.pad_token is None:
    tok.pad_token = PAD_TOKEN
  missing = [t for t in ADDITIONAL_SPECIAL_TOKENS if t not in vocab]
  if missing:
    try:
      tok.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    except (TypeError, ValueError, KeyError):  # transformers < 5
      tok.add_special_tokens({"additional_special_tokens": missing})


_LOAD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(path: str) -> NextStepTokenizer:
  return NextStepTokenizer(path)


def load_tokenizer(path: str | os.PathLike) -> NextStepTokenizer:
  """A cached `NextStepTokenizer` per directory (one per process). Thread-safe: Grain reader threads call it
  concurrently, and importing `transformers` from two threads at once fails."""
  with _LOAD_LOCK:
    return _cached_tokenizer(str(path))


def vocab_id(path: str | os.PathLike, token: str) -> int | None:
  """The id of `token` in the tokenizer at `path` as `transformers` loads it (tokenizer_config.json's added tokens
  win over tokenizer.json's), or None when `path` holds no tokenizer or the token is absent. Conversion reads
  special ids this way so that the model config and the loaded tokenizer cannot disagree."""
  from transformers import AutoTokenizer
  if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
    return None
  with _LOAD_LOCK:
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True).get_vocab().get(token)


# ----------------------------------------------------------------------------------------------- padding


def left_pad(rows: Sequence[Sequence[int]], pad_id: int,
             buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads prompt rows to the smallest bucket >= the longest row → (ids (B, Lb) int32, mask (B, Lb) int32).

  Padding to a bucket (not to the longest row) keeps the set of compiled prefill shapes small.
  """
  if not rows:
    raise TokenizerError("left_pad needs at least one row")
  longest = max(len(r) for r in rows)
  fitting = sorted(b for b in buckets if b >= longest)
  if not fitting:
    raise TokenizerError(f"prompt of {longest} tokens exceeds the largest bucket/cache {max(buckets)}; "
                         f"shorten the prompt or add a larger prompt bucket (and cache length)")
  length = fitting[0]
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    if len(r):
      ids[i, length - len(r):] = r
      mask[i, length - len(r):] = 1
  return ids, mask


# ----------------------------------------------------------------------------------------------- byte tokenizer


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte → printable-unicode map (what the ByteLevel pre-tokenizer emits)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def make_byte_tokenizer(out_dir: str | os.PathLike, words: Sequence[str] = ()) -> str:
  """Writes a byte-level tokenizer like the tiny fixture's into `out_dir` (no downloads) and returns the path.

  Every UTF-8 byte is one token with id = byte value; `<|endoftext|>` = 256 (EOS, no BOS); two reserved specials
  257, 258; then `SPECIAL_TOKENS` at 259…267 (`[PAD]` = 259). Loadable with `AutoTokenizer.from_pretrained`.
  `words` (pre-tokenizer pieces, e.g. " circle") become single tokens through BPE merges, ids 268… (the merged
  prefixes too); all other text still encodes byte by byte.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  b2u = _bytes_to_unicode()
  vocab = {ch: b for b, ch in b2u.items()}
  specials = (BYTE_EOS_TOKEN,) + _BYTE_RESERVED + SPECIAL_TOKENS
  vocab.update({t: 256 + i for i, t in enumerate(specials)})  # in the model vocab: the added specials keep these ids
  merges = []
  for word in words:
    chars = [b2u[b] for b in word.encode()]
    piece = chars[0]
    for ch in chars[1:]:
      if piece + ch not in vocab:
        vocab[piece + ch] = len(vocab)
        merges.append((piece, ch))
      piece = piece + ch
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
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  fast.save_pretrained(str(out_dir))
  return str(out_dir)


def byte_tokenizer_ids() -> dict[str, int]:
  """The special ids `make_byte_tokenizer` assigns (for ModelConfig presets): {token: id}."""
  specials = (BYTE_EOS_TOKEN,) + _BYTE_RESERVED + SPECIAL_TOKENS
  return {t: 256 + i for i, t in enumerate(specials)}
