"""Making preference pairs (`nextstep-jax data prefs`): from a model's own samples ranked by any scorer, or from
existing (prompt, chosen, rejected) image files.

Self-generated pairs: for each prompt the Sampler draws K images; a scorer `score(image_uint8, prompt) -> float`
rates each; the best and the worst make a pair when their scores differ by at least `margin` (else the prompt is
skipped and counted). The pair's tokens are the VAE encoding of the decoded images (`tokens="encode"`, the same
path as the t2i latent cache, so pairs look like training data) or the sampled tokens themselves
(`tokens="sampled"`). Scorers: "shapes" (the shapes-world evaluator: fraction of its verdicts color, kind, count,
objects, position, fully_correct that hold) or any "package.module:function".

Imported pairs: a `.jsonl` of {"prompt", "chosen", "rejected"} (image paths relative to the file) is encoded with a
model directory's VAE (chosen image → nearest aspect bucket; the rejected one is fitted to the same size).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from nextstep_jax.convert.vae import load_vae
from nextstep_jax.data import shapes
from nextstep_jax.data.buckets import bucket_grids
from nextstep_jax.data.builders import jsonl_records, read_bytes
from nextstep_jax.config import LATENT_PATCH_SIZE
from nextstep_jax.data.latent_cache import make_encoder
from nextstep_jax.data.preferences import write_prefs
from nextstep_jax.data.records import BadRecord, encode_png, meta_json, require_text
from nextstep_jax.data.samples import prepare_image
from nextstep_jax.eval.shapes_scorer import score_image
from nextstep_jax.images import resize_center_crop
from nextstep_jax.sampling.pipeline import Sampler

Scorer = Callable[[np.ndarray, str], float]
SHAPES_VERDICTS = ("color", "kind", "count", "objects", "position", "fully_correct")


def shapes_score(image: np.ndarray, prompt: str) -> float:
  """Fraction of the shapes evaluator's verdicts that hold for `image` under `prompt` (0…1, steps of 1/6)."""
  verdicts = score_image(image, prompt)
  return float(np.mean([bool(verdicts[k]) for k in SHAPES_VERDICTS]))


def load_scorer(name: str) -> Scorer:
  """"shapes", or "package.module:function" naming any `score(image_uint8, prompt) -> float`."""
  if name == "shapes":
    return shapes_score
  module, _, attr = name.partition(":")
  if not attr:
    raise ValueError(f"--scorer {name!r}: use 'shapes' or 'package.module:function'")
  fn = getattr(importlib.import_module(module), attr, None)
  if not callable(fn):
    raise ValueError(f"--scorer {name!r}: {module} has no callable {attr!r}")
  return fn


def shapes_prompts(n: int, seed: int = 0) -> list[str]:
  """`n` captions of the shapes world's training distribution (the stream of `data build --kind shapes`)."""
  return [shapes.sample_scene(shapes.scene_rng(seed, i)).caption for i in range(n)]


def read_prompts(path: str | os.PathLike) -> list[str]:
  prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
  if not prompts:
    raise ValueError(f"{path} holds no prompts (one per line)")
  return prompts


def choose_pair(scores: Sequence[float], margin: float) -> tuple[int, int] | None:
  """(best, worst) indices when max − min ≥ margin (> 0 always required), else None."""
  s = np.asarray(scores, np.float64)
  best, worst = int(np.argmax(s)), int(np.argmin(s))
  gap = s[best] - s[worst]
  return (best, worst) if gap > 0 and gap >= margin else None


@dataclasses.dataclass(frozen=True)
class PairSettings:
  k: int = 4  # samples per prompt
  margin: float = 0.1  # keep best vs worst only when their scores differ by at least this (and by > 0)
  prompts_per_call: int = 8  # prompts per compiled sampling call (K images each)
  tokens: str = "encode"  # encode | sampled


def sampled_pairs(sampler, prompts: Sequence[str], score: Scorer, opts, s: PairSettings = PairSettings(),
                  counts: dict | None = None) -> Iterator[tuple[int, dict]]:
  """Yields (key, ns_prefs example) for the prompts whose K samples contain a pair.

  `opts`: sampling `Options` (size, steps, cfg, sampler, …); call i uses seed opts.seed + i and K images per
  prompt. `counts` gets {"prompts", "pairs", "no_margin", "score_best", "score_worst", "score_mean"} (sums)."""
  if s.tokens not in ("encode", "sampled"):
    raise ValueError(f"tokens={s.tokens!r} must be 'encode' or 'sampled'")
  if s.k < 2:
    raise ValueError(f"--k {s.k}: need at least 2 samples per prompt to rank")
  counts = {} if counts is None else counts
  for key in ("prompts", "pairs", "no_margin", "score_best", "score_worst", "score_mean"):
    counts.setdefault(key, 0)
  encode = None
  if s.tokens == "encode":
    encode = make_encoder(sampler.vae_cfg, sampler.vae_params)
  grid = np.asarray(sampler.token_grid(opts.height, opts.width), np.int32)
  n_out = 0
  for call, start in enumerate(range(0, len(prompts), s.prompts_per_call)):
    chunk = list(prompts[start:start + s.prompts_per_call])
    call_opts = dataclasses.replace(opts, num_images_per_prompt=s.k, seed=opts.seed + call, decode=True,
                                    independent_noise=True)  # not one noise set tiled across the call's prompts
    out = sampler.text_to_image(chunk, call_opts)
    tokens = encode(out.images) if encode is not None else np.asarray(out.tokens, np.float32)
    for j, prompt in enumerate(chunk):
      first = j * s.k  # each prompt's K images are consecutive
      scores = [float(score(im, prompt)) for im in out.images[first:first + s.k]]
      counts["prompts"] += 1
      counts["score_mean"] += float(np.mean(scores))
      pick = choose_pair(scores, s.margin)
      if pick is None:
        counts["no_margin"] += 1
        continue
      b, w = pick
      counts["pairs"] += 1
      counts["score_best"] += scores[b]
      counts["score_worst"] += scores[w]
      yield n_out, dict(prompt=prompt, chosen=encode_png(out.images[first + b]),
                        rejected=encode_png(out.images[first + w]), chosen_tokens=tokens[first + b],
                        rejected_tokens=tokens[first + w], grid=grid, chosen_score=np.float32(scores[b]),
                        rejected_score=np.float32(scores[w]),
                        meta=meta_json(scores=scores, seed=call_opts.seed, sample=b, rejected_sample=w,
                                       tokens=s.tokens))
      n_out += 1


def make_prefs_from_model(model_dir: str | os.PathLike, prompts: Sequence[str], dst: str | os.PathLike,
                          score: Scorer, opts, settings: PairSettings = PairSettings(),
                          overwrite: bool = False) -> tuple[str, dict]:
  """Samples K images per prompt with the model at `model_dir`, writes the ranked pairs as `ns_prefs` under dst."""
  sampler = Sampler.from_checkpoint(model_dir)
  counts: dict = {}
  return _write(dst, lambda: sampled_pairs(sampler, prompts, score, opts, settings, counts), counts, overwrite,
                f"no prompt gave a pair (the scores of its {settings.k} samples never differed by --margin "
                f"{settings.margin}); sample more per prompt (--k), lower --margin or use more prompts")


def _write(dst, examples, counts: dict, overwrite: bool, none_msg: str) -> tuple[str, dict]:
  """write_prefs, with a clear error (instead of TFDS's assertion) when no pair came out."""
  try:
    return write_prefs(dst, examples, overwrite=overwrite), counts
  except AssertionError:
    if counts.get("pairs"):
      raise
    raise ValueError(f"{none_msg} ({counts})") from None


def imported_pairs(src: str | os.PathLike, encode: Callable[[np.ndarray], np.ndarray], down_factor: int,
                   resolution: int = 256, buckets: str = "aspect", counts: dict | None = None
                   ) -> Iterator[tuple[int, dict]]:
  """(key, ns_prefs example) per usable line of a {"prompt", "chosen", "rejected"} .jsonl; bad lines are skipped
  and counted in `counts["skipped/<reason>"]`."""
  counts = {} if counts is None else counts
  grids, path = bucket_grids(resolution, down_factor, buckets), Path(src)
  n_out = 0
  for line_no, r in jsonl_records(path):
    try:
      prompt = require_text(r.get("prompt"), "prompt")
      raw = [read_bytes(path.parent / r.get(k, "")) for k in ("chosen", "rejected")]
      chosen, grid = prepare_image(raw[0], grids, down_factor)
      rejected, _ = prepare_image(raw[1], grids, down_factor, min_size_ratio=1e-6)
    except BadRecord as e:
      counts[f"skipped/{e.reason}"] = counts.get(f"skipped/{e.reason}", 0) + 1
      continue
    toks = encode(np.stack([chosen, resize_center_crop(rejected, chosen.shape[:2])]))
    counts["pairs"] = counts.get("pairs", 0) + 1
    yield n_out, dict(prompt=prompt, chosen=raw[0], rejected=raw[1], chosen_tokens=toks[0], rejected_tokens=toks[1],
                      grid=np.asarray(grid, np.int32), chosen_score=np.float32(r.get("chosen_score", 1.0)),
                      rejected_score=np.float32(r.get("rejected_score", 0.0)),
                      meta=json.dumps({"line": line_no, "chosen": r.get("chosen"), "rejected": r.get("rejected")}))
    n_out += 1


def import_prefs(src: str | os.PathLike, dst: str | os.PathLike, vae_dir: str | os.PathLike, resolution: int = 256,
                 buckets: str = "aspect", overwrite: bool = False) -> tuple[str, dict]:
  """`imported_pairs` encoded with the VAE of `vae_dir`, written as `ns_prefs` under dst."""
  vae_cfg, params = load_vae(vae_dir)
  encode = make_encoder(vae_cfg, params, shard=False)
  counts: dict = {}
  down = vae_cfg.downsample_factor * LATENT_PATCH_SIZE
  return _write(dst, lambda: imported_pairs(src, encode, down, resolution, buckets, counts), counts, overwrite,
                f"no usable pair in {src}; lines need prompt, chosen and rejected image paths")
