"""Mini-GenEval for the synthetic shapes world: detect coloured shapes by image analysis and check a caption.

Detection (`detect`), numpy only:
  1. Per pixel, an opponent-colour vector (a = R − (G+B)/2, b = √3/2·(G − B)); its angle is the hue, its length
     the chroma. Blending a colour with the grey/white background (anti-aliasing, blur, VAE smearing) scales
     chroma but keeps hue, so each pixel is tentatively given the palette colour of the nearest hue (within
     `hue_tol` degrees), then kept as that colour when its estimated coverage — the projection of
     (pixel − background) onto (colour − background), all three channels, so full-resolution luma counts even
     where chroma is smeared (JPEG 4:2:0) — is at least `coverage` (object boundaries sit at ~45 % coverage
     whatever the blur) and its chroma is at least `min_chroma_frac` of the colour's (greys and darks are never
     objects). Hues outside every tolerance band (purple, cyan-ish) are background.
  2. 8-connected components of equal colour (run-length union-find); components smaller than `min_area_frac`
     of the image are dropped (noise specks, colour fringes).
  3. Kind from blur-tolerant geometry (`shape_features`, `classify_kind`): a triangle's pixel distribution is
     skewed (its apex may erode under blur, its lopsided mass stays); a square fills its axis-aligned bounding
     box (fill ≈ 1) far better than its 45°-rotated one (≈ 0.5), a circle fills both alike (π/4). Stringy
     (fill < 0.4) or elongated (aspect > 1.6) blobs are "unknown".
  4. Position: bounding-box centres; relations follow GenEval's `relative_position` rule (offset shrunk by 10 % of
     the summed box sizes, then the normalised offset must exceed 0.5 along the relation axis).

Scoring (`score_image`), per prompt:
  color     every required colour is detected (as a multiset)
  kind      every required kind is detected (as a multiset)
  count     exactly as many objects are detected as the caption names
  objects   every required (colour, kind) object is matched to its own detection
  position  the relation holds between the matched objects (matched by colour and kind, else by colour, else by
            kind); vacuously True for one-object prompts, and `score_batch` averages it over relational
            prompts only
  fully_correct  count ∧ objects ∧ the relation holds for an exact (colour and kind) matching
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter
from typing import Sequence

import numpy as np

from nextstep_jax.data.shapes import BACKGROUND, COLORS, scene_from_caption

POSITION_THRESHOLD = 0.1  # GenEval's default
_GENEVAL_RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def _opponent(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(hue in degrees [0, 360), chroma) of float RGB values in 0..255, shape (..., 3)."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  a = r - 0.5 * (g + b)
  bb = (math.sqrt(3) / 2) * (g - b)
  return np.degrees(np.arctan2(bb, a)) % 360.0, np.hypot(a, bb)


_PALETTE_NAMES = tuple(COLORS)
_PALETTE_RGB = np.asarray([COLORS[c] for c in _PALETTE_NAMES], np.float32)
_BG = np.asarray(BACKGROUND, np.float32)
_PALETTE_HUE, _PALETTE_CHROMA = _opponent(_PALETTE_RGB)


@dataclasses.dataclass(frozen=True)
class Detection:
  """One detected object; geometry relative to the image (x rightwards, y downwards, bbox end-exclusive)."""
  color: str
  kind: str  # circle / square / triangle / unknown
  cx: float  # bounding-box centre
  cy: float
  bbox: tuple[float, float, float, float]  # x0, y0, x1, y1
  area: float  # pixel count / image pixels
  features: dict[str, float] = dataclasses.field(default_factory=dict, compare=False)  # see shape_features


def _as_float_rgb(image) -> np.ndarray:
  """(H, W, 3) float32 in 0..255 from uint8, or from floats in [0, 1]; an alpha channel is dropped."""
  arr = np.asarray(image)
  if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
    raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
  arr = arr[..., :3]
  if np.issubdtype(arr.dtype, np.floating):
    return np.clip(arr.astype(np.float32), 0.0, 1.0) * np.float32(255.0)
  return arr.astype(np.float32)


def classify_pixels(image, coverage: float = 0.45, min_chroma_frac: float = 0.25,
                    hue_tol: float = 45.0) -> np.ndarray:
  """int (H, W) map: 0 background, i+1 for palette colour `tuple(COLORS)[i]` (see the module docstring)."""
  rgb = _as_float_rgb(image)
  hue, chroma = _opponent(rgb)
  diff = np.abs(hue[..., None] - _PALETTE_HUE)
  dist = np.minimum(diff, 360.0 - diff)
  nearest = np.argmin(dist, axis=-1)
  ref = _PALETTE_RGB[nearest] - _BG
  alpha = ((rgb - _BG) * ref).sum(-1) / (ref * ref).sum(-1)
  ok = ((np.take_along_axis(dist, nearest[..., None], -1)[..., 0] <= hue_tol)
        & (chroma >= min_chroma_frac * _PALETTE_CHROMA[nearest]) & (alpha >= coverage))
  return np.where(ok, nearest + 1, 0)


def _find(parent: list[int], i: int) -> int:
  while parent[i] != i:
    parent[i] = parent[parent[i]]
    i = parent[i]
  return i


def label_components(classes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """8-connected components of equal non-zero values of an int (H, W) map.

  Returns (labels, comp, runs): labels int32 (H, W), 0 for background and 1..n per component; runs int (R, 4),
  the horizontal runs as (row, start, end exclusive, value); comp (R,), the component index 0..n-1 of each run.
  """
  h, w = classes.shape
  change = np.ones((h, w), bool)
  change[:, 1:] = classes[:, 1:] != classes[:, :-1]
  rows, starts = np.nonzero(change)
  ends = np.append(starts[1:], w)
  ends[np.append(rows[1:] != rows[:-1], True)] = w
  vals = classes[rows, starts]
  keep = vals != 0
  runs = np.stack([rows[keep], starts[keep], ends[keep], vals[keep]], axis=1).astype(np.int64)
  n_runs = len(runs)
  parent = list(range(n_runs))
  row_ptr = np.searchsorted(runs[:, 0], np.arange(h + 1))
  for r in range(1, h):
    p0, p1, c0, c1 = row_ptr[r - 1], row_ptr[r], row_ptr[r], row_ptr[r + 1]
    if p0 == p1 or c0 == c1:
      continue
    prev, cur = runs[p0:p1], runs[c0:c1]
    # prev run i touches cur run j (8-connectivity) iff start_i <= end_j and end_i >= start_j
    lo = np.searchsorted(prev[:, 2], cur[:, 1], side="left")
    hi = np.searchsorted(prev[:, 1], cur[:, 2], side="right")
    for j in range(len(cur)):
      for i in range(lo[j], hi[j]):
        if prev[i, 3] == cur[j, 3]:
          a, b = _find(parent, p0 + i), _find(parent, c0 + j)
          if a != b:
            parent[max(a, b)] = min(a, b)
  roots = np.asarray([_find(parent, i) for i in range(n_runs)], np.int64)
  _, comp = np.unique(roots, return_inverse=True)
  lengths = runs[:, 2] - runs[:, 1]
  flat_start = runs[:, 0] * w + runs[:, 1]
  total = int(lengths.sum())
  offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  labels = np.zeros(h * w, np.int32)
  labels[np.repeat(flat_start, lengths) + offsets] = np.repeat(comp + 1, lengths)
  return labels.reshape(h, w), comp, runs


def shape_features(mask: np.ndarray) -> dict[str, float]:
  """Blur-tolerant geometry of a boolean mask cropped to its bounding box.

  fill       area / bounding-box area (circle π/4, square 1, triangle 1/2)
  diag_fill  area / area of the 45°-rotated bounding box (circle π/4, square 1/2, triangle 4/9)
  skew       largest |skewness| of the x or y pixel distribution (circle, square 0; triangle 2√2/5 ≈ 0.57)
  aspect     long / short bounding-box side (1 for every shape of the world)
  """
  ys, xs = np.nonzero(mask)
  area = float(len(xs))
  h, w = mask.shape
  u, v = xs + ys, xs - ys
  diag_area = (u.max() - u.min() + 1) * (v.max() - v.min() + 1) / 2

  def skewness(z):
    z = z - z.mean()
    return abs(float((z ** 3).mean())) / max(float((z ** 2).mean()), 1e-9) ** 1.5

  return {"fill": area / (h * w), "diag_fill": area / diag_area,
          "skew": max(skewness(xs.astype(np.float64)), skewness(ys.astype(np.float64))),
          "aspect": max(h, w) / min(h, w)}


def classify_kind(features: dict[str, float], skew_min: float = 0.2, square_margin: float = 0.12,
                  min_fill: float = 0.4, max_aspect: float = 1.6) -> str:
  """circle / square / triangle from `shape_features`, "unknown" for stringy or elongated blobs.

  A triangle's mass is lopsided (skew ≥ `skew_min`, even with its apex eroded by blur); a square fills its
  axis-aligned box much better than its diagonal box (fill − diag_fill ≥ `square_margin`, ~0.45 sharp and
  ≥ 0.18 under blur), a circle fills both equally.
  """
  if features["fill"] < min_fill or features["aspect"] > max_aspect:
    return "unknown"
  if features["skew"] >= skew_min:
    return "triangle"
  return "square" if features["fill"] - features["diag_fill"] >= square_margin else "circle"


def detect(image, min_area_frac: float = 0.006, **pixel_kwargs) -> list[Detection]:
  """Shapes in an RGB image (uint8, or float in [0, 1]), largest first; `pixel_kwargs` go to `classify_pixels`."""
  classes = classify_pixels(image, **pixel_kwargs)
  h, w = classes.shape
  labels, comp, runs = label_components(classes)
  n = int(comp.max()) + 1 if len(comp) else 0
  if n == 0:
    return []
  area = np.bincount(comp, weights=runs[:, 2] - runs[:, 1], minlength=n)
  x0 = np.full(n, w); y0 = np.full(n, h); x1 = np.zeros(n, np.int64); y1 = np.zeros(n, np.int64)
  np.minimum.at(x0, comp, runs[:, 1]); np.maximum.at(x1, comp, runs[:, 2])
  np.minimum.at(y0, comp, runs[:, 0]); np.maximum.at(y1, comp, runs[:, 0] + 1)
  color = np.zeros(n, np.int64)
  color[comp] = runs[:, 3]
  min_area = max(4.0, min_area_frac * h * w)
  out = []
  for k in np.argsort(-area, kind="stable"):
    if area[k] < min_area:
      break
    mask = labels[y0[k]:y1[k], x0[k]:x1[k]] == k + 1
    features = shape_features(mask)
    out.append(Detection(color=_PALETTE_NAMES[color[k] - 1], kind=classify_kind(features),
                         cx=(x0[k] + x1[k]) / (2 * w), cy=(y0[k] + y1[k]) / (2 * h),
                         bbox=(x0[k] / w, y0[k] / h, x1[k] / w, y1[k] / h), area=float(area[k] / (h * w)),
                         features=features))
  return out


def relations_between(a: Detection, b: Detection, threshold: float = POSITION_THRESHOLD) -> set[str]:
  """Relations of `a` relative to `b` by GenEval's rule, in caption wording ("above", "to the left of", …)."""
  centre = np.array([a.cx - b.cx, a.cy - b.cy])
  dims = np.array([a.bbox[2] - a.bbox[0] + b.bbox[2] - b.bbox[0], a.bbox[3] - a.bbox[1] + b.bbox[3] - b.bbox[1]])
  revised = np.maximum(np.abs(centre) - threshold * dims, 0) * np.sign(centre)
  if np.all(np.abs(revised) < 1e-3):
    return set()
  dx, dy = revised / np.linalg.norm(centre)
  found = set()
  if dx < -0.5: found.add("left of")
  if dx > 0.5: found.add("right of")
  if dy < -0.5: found.add("above")
  if dy > 0.5: found.add("below")
  return {_GENEVAL_RELATIONS[r] for r in found}


def _contains(have: Sequence[str], need: Sequence[str]) -> bool:
  """`need` is a sub-multiset of `have`."""
  return not (Counter(need) - Counter(have))


def _matchings(dets: Sequence[Detection], req, keys: tuple[str, ...]) -> list[tuple[int, ...]]:
  """Injective assignments of required objects to detections that agree on the attributes `keys`."""
  return [p for p in itertools.permutations(range(len(dets)), len(req))
          if all(getattr(dets[j], k) == getattr(o, k) for j, o in zip(p, req) for k in keys)]


def score_detections(detections: Sequence[Detection], caption: str) -> dict[str, bool]:
  """Per-attribute verdicts of detections against a shapes caption (see the module docstring).

  `position` is judged on the objects matched by colour and kind; if there is no such matching, on those
  matched by colour alone, then by kind alone (so it stays informative when one attribute is wrong; a
  fully-correct verdict still needs the exact matching).
  """
  scene = scene_from_caption(caption)
  req, dets = scene.objects, list(detections)
  exact = _matchings(dets, req, ("color", "kind"))
  position = True
  if scene.relation is not None:
    pairs = exact or _matchings(dets, req, ("color",)) or _matchings(dets, req, ("kind",))
    position = any(scene.relation in relations_between(dets[i], dets[j]) for i, j in pairs)
  exact_position = scene.relation is None or any(
      scene.relation in relations_between(dets[i], dets[j]) for i, j in exact)
  result = {
      "color": _contains([d.color for d in dets], [o.color for o in req]),
      "kind": _contains([d.kind for d in dets], [o.kind for o in req]),
      "count": len(dets) == len(req),
      "objects": bool(exact),
      "position": position,
      "has_relation": scene.relation is not None,
  }
  result["fully_correct"] = result["count"] and result["objects"] and exact_position
  return result


def score_image(image, caption: str, **detect_kwargs) -> dict[str, bool]:
  """Per-attribute verdicts for one image and its prompt (keys: color, kind, count, objects, position,
  has_relation, fully_correct)."""
  return score_detections(detect(image, **detect_kwargs), caption)


def score_batch(images, captions: Sequence[str], **detect_kwargs) -> dict:
  """Accuracies over a batch: color, kind, count, objects, fully_correct (all prompts), position (relational
  prompts only; NaN if none), fully_correct_single / fully_correct_two (by prompt type; NaN if none), and the
  counts n, n_relation."""
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images but {len(captions)} captions")
  rows = [score_image(im, cap, **detect_kwargs) for im, cap in zip(images, captions)]

  def mean(key, subset):
    vals = [r[key] for r in subset]
    return float(np.mean(vals)) if vals else float("nan")

  rel = [r for r in rows if r["has_relation"]]
  single = [r for r in rows if not r["has_relation"]]
  out = {k: mean(k, rows) for k in ("color", "kind", "count", "objects", "fully_correct")}
  out.update(position=mean("position", rel), fully_correct_single=mean("fully_correct", single),
             fully_correct_two=mean("fully_correct", rel), n=len(rows), n_relation=len(rel))
  return out
