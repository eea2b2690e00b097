"""Synthetic shapes world: coloured circles / squares / triangles on a plain background, with captions.

Pure numpy, deterministic. A `Scene` holds one or two `ShapeSpec`s and its caption:

  one object   "a red circle"
  two objects  "a red circle above a blue square"   (relations: above, below, to the left of, to the right of)

Geometry is relative to the image side (all in [0, 1]; x grows rightwards, y downwards): `cx, cy` is the centre of
the object's square bounding box and `size` its side (circle diameter, square side, triangle base and height; the
triangle points up). Layouts are built so every caption is unambiguous at any resolution: objects lie fully inside
the image with a margin, never overlap, are separated by a clear gap along the relation axis, stay within a
narrow band across it (so the relation is the dominant direction in GenEval's sense), and are at least
`MIN_SIZE` = 30% of the side (≥ 9.6 px at 32², ≥ 19 px at 64²: large enough that the kind stays legible after a
small VAE and a small model at the CPU demo's 32×32 px; sizes vary little, which keeps the world easy to learn).

Colours were chosen with well separated hues (red 0°, yellow ~52°, green ~129°, blue ~223°) and high chroma on an
almost white, chroma-free background, so that blends with the background (anti-aliasing, blur, VAE smearing) keep
their hue: this is what the mini-GenEval scorer (`nextstep_jax.eval.shapes_scorer`) relies on.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (230, 200, 30),
    "green": (40, 180, 60),
    "blue": (40, 90, 220),
}
KINDS = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "to the left of", "to the right of")
BACKGROUND: tuple[int, int, int] = (240, 240, 240)

MIN_SIZE = 0.30  # smallest object side, relative to the image side
MARGIN = 0.04  # free border around every object
MIN_GAP = 0.08  # smallest free gap between the two objects along the relation axis
SINGLE_SIZE = (0.40, 0.50)
PAIR_SIZE = (MIN_SIZE, 0.36)  # two objects + margins + gap must fit: 2·0.36 + 2·MARGIN + MIN_GAP < 1
MAX_CROSS_RATIO = 0.4  # |offset across the relation axis| <= this × offset along it
_SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
  """One object. `cx, cy, size` are relative to the image side; NaN where unknown (parsed from a caption)."""
  color: str
  kind: str
  cx: float
  cy: float
  size: float

  @property
  def phrase(self) -> str:
    return f"a {self.color} {self.kind}"


@dataclasses.dataclass(frozen=True)
class Scene:
  """Objects in caption order; for two objects the caption reads `objects[0] <relation> objects[1]`."""
  objects: tuple[ShapeSpec, ...]
  relation: str | None
  caption: str

  def to_json(self) -> str:
    return json.dumps({"objects": [dataclasses.asdict(o) for o in self.objects], "relation": self.relation,
                       "caption": self.caption})

  @classmethod
  def from_json(cls, text: str) -> "Scene":
    d = json.loads(text)
    return cls(objects=tuple(ShapeSpec(**o) for o in d["objects"]), relation=d["relation"], caption=d["caption"])


def make_caption(objects: tuple[ShapeSpec, ...] | list[ShapeSpec], relation: str | None) -> str:
  if len(objects) == 1 and relation is None:
    return objects[0].phrase
  if len(objects) == 2 and relation in RELATIONS:
    return f"{objects[0].phrase} {relation} {objects[1].phrase}"
  raise ValueError(f"a caption needs one object and no relation, or two objects and one of {RELATIONS}; "
                   f"got {len(objects)} objects and relation {relation!r}")


def _split(total: float, parts: int, rng: np.random.Generator) -> np.ndarray:
  """`total` split into `parts` non-negative random pieces."""
  return total * rng.dirichlet(np.ones(parts))


def _sample_pair_layout(relation: str, sizes: tuple[float, float], rng: np.random.Generator):
  """Centres ((x0, y0), (x1, y1)) of caption objects 0 and 1 satisfying `relation` with a clear gap."""
  first = 0 if relation in ("above", "to the left of") else 1  # the object nearer the top / left
  s_near, s_far = sizes[first], sizes[1 - first]
  slack = 1.0 - 2 * MARGIN - s_near - s_far - MIN_GAP
  assert slack > 0, "object sizes leave no room for the layout"
  before, extra_gap, _ = _split(slack, 3, rng)
  near = MARGIN + before + s_near / 2
  far = near + s_near / 2 + MIN_GAP + extra_gap + s_far / 2
  # across the relation axis: the near object anywhere valid, the far one within a narrow band around it
  cross_near = rng.uniform(MARGIN + s_near / 2, 1 - MARGIN - s_near / 2)
  band = MAX_CROSS_RATIO * (far - near)
  lo = max(MARGIN + s_far / 2, cross_near - band)
  hi = min(1 - MARGIN - s_far / 2, cross_near + band)
  cross_far = rng.uniform(lo, hi)
  along = {first: near, 1 - first: far}
  cross = {first: cross_near, 1 - first: cross_far}
  vertical = relation in ("above", "below")
  return tuple((cross[i], along[i]) if vertical else (along[i], cross[i]) for i in (0, 1))


def _sample_object_style(rng: np.random.Generator) -> tuple[str, str]:
  return str(rng.choice(list(COLORS))), str(rng.choice(KINDS))


def sample_scene(rng: np.random.Generator, two_object_prob: float = 0.7) -> Scene:
  """A random scene: two objects (distinct colour-kind pairs, random relation) with probability `two_object_prob`."""
  if rng.random() >= two_object_prob:
    color, kind = _sample_object_style(rng)
    size = rng.uniform(*SINGLE_SIZE)
    cx, cy = rng.uniform(MARGIN + size / 2, 1 - MARGIN - size / 2, size=2)
    objects = (ShapeSpec(color, kind, float(cx), float(cy), float(size)),)
    return Scene(objects, None, make_caption(objects, None))
  style_a = _sample_object_style(rng)
  style_b = style_a
  while style_b == style_a:  # identical objects would make the relation meaningless
    style_b = _sample_object_style(rng)
  relation = str(rng.choice(RELATIONS))
  sizes = tuple(float(s) for s in rng.uniform(*PAIR_SIZE, size=2))
  centres = _sample_pair_layout(relation, sizes, rng)
  objects = tuple(ShapeSpec(c, k, float(x), float(y), s)
                  for (c, k), (x, y), s in zip((style_a, style_b), centres, sizes))
  return Scene(objects, relation, make_caption(objects, relation))


def _inside(kind: str, x: np.ndarray, y: np.ndarray, obj: ShapeSpec) -> np.ndarray:
  """Boolean membership of points (relative coordinates) in the object."""
  h = obj.size / 2
  dx, dy = x - obj.cx, y - obj.cy
  if kind == "circle":
    return dx * dx + dy * dy <= h * h
  if kind == "square":
    return (np.abs(dx) <= h) & (np.abs(dy) <= h)
  if kind == "triangle":  # apex at the top centre, base along the bottom edge; width grows 1:1 with depth
    depth = dy + h
    return (depth >= 0) & (dy <= h) & (np.abs(dx) <= depth / 2)
  raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def _pixel_span(centre: float, half: float, size: int) -> tuple[int, int]:
  """Pixels [lo, hi) that an interval centre ± half (relative) touches."""
  return max(0, math.floor((centre - half) * size)), min(size, math.ceil((centre + half) * size))


def render(scene: Scene, size: int = 64) -> np.ndarray:
  """uint8 (size, size, 3) image; edges anti-aliased by 4×4 supersampling of the exact coverage."""
  ss = _SUPERSAMPLE
  image = np.broadcast_to(np.asarray(BACKGROUND, np.float64), (size, size, 3)).copy()
  for obj in scene.objects:  # supersampled only over the object's own bounding box
    (x0, x1), (y0, y1) = _pixel_span(obj.cx, obj.size / 2, size), _pixel_span(obj.cy, obj.size / 2, size)
    x = ((np.arange(x0 * ss, x1 * ss) + 0.5) / (size * ss))[None, :]
    y = ((np.arange(y0 * ss, y1 * ss) + 0.5) / (size * ss))[:, None]
    mask = _inside(obj.kind, x, y, obj)
    coverage = mask.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))[..., None]
    patch = image[y0:y1, x0:x1]
    image[y0:y1, x0:x1] = patch * (1 - coverage) + np.asarray(COLORS[obj.color], np.float64) * coverage
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def scene_rng(seed: int, index: int) -> np.random.Generator:
  """The generator of example `index` of dataset `seed` (independent streams, stable across numpy versions)."""
  return np.random.default_rng([int(seed), int(index)])


def make_example(index: int, seed: int = 0, size: int = 64, two_object_prob: float = 0.7) -> dict:
  """Example `index` of the dataset with `seed`: {"image": uint8 HxWx3, "caption": str, "scene": json str}."""
  scene = sample_scene(scene_rng(seed, index), two_object_prob)
  return {"image": render(scene, size), "caption": scene.caption, "scene": scene.to_json()}


_NAN = float("nan")
_OBJECT_RE = r"an? (%s) (%s)" % ("|".join(COLORS), "|".join(KINDS))
_CAPTION_RE = re.compile(r"^%s(?: (%s) %s)?$" % (_OBJECT_RE, "|".join(RELATIONS), _OBJECT_RE))


def scene_from_caption(caption: str) -> Scene:
  """The attributes a caption requires (colours, kinds, relation); positions and sizes are NaN (not fixed)."""
  m = _CAPTION_RE.match(" ".join(caption.strip().lower().rstrip(".").split()))
  if m is None:
    raise ValueError(f"not a shapes caption: {caption!r} (expected e.g. 'a red circle' or "
                     f"'a red circle above a blue square')")
  color_a, kind_a, relation, color_b, kind_b = m.groups()
  objects = [ShapeSpec(color_a, kind_a, _NAN, _NAN, _NAN)]
  if relation is not None:
    objects.append(ShapeSpec(color_b, kind_b, _NAN, _NAN, _NAN))
  return Scene(tuple(objects), relation, caption)


def caption_space() -> list[str]:
  """Every caption the world can produce: 12 single-object + 12·11·4 = 528 two-object captions."""
  styles = [ShapeSpec(c, k, _NAN, _NAN, _NAN) for c, k in itertools.product(COLORS, KINDS)]
  singles = [make_caption((s,), None) for s in styles]
  pairs = [make_caption((a, b), r) for a, b in itertools.permutations(styles, 2) for r in RELATIONS]
  return singles + pairs


_HELD_OUT_STREAM = 0x5EED_E7A1  # salt separating evaluation streams from the training streams (index >= 0)


def held_out_prompts(n: int, seed: int, two_object_prob: float = 0.7) -> list[str]:
  """`n` evaluation captions drawn from the training distribution with an independent random stream.

  Held out is the *draw* (seed / layout), not the caption text: the world has only 540 captions
  (`caption_space()`), so a model trained on a few thousand examples has seen nearly every caption and the
  evaluation captions overlap the training caption space by design. What the model has never seen is the exact
  (caption, layout) pair and the sampling noise used at evaluation; the score therefore measures whether the
  model renders the required colours, kinds, count and relation, not generalisation to unseen word combinations.
  """
  return [scene.caption for scene in held_out_scenes(n, seed, two_object_prob)]


def held_out_scenes(n: int, seed: int, two_object_prob: float = 0.7) -> list[Scene]:
  """The scenes whose captions `held_out_prompts(n, seed)` returns (render them for ground-truth references)."""
  rng = np.random.default_rng([int(seed), _HELD_OUT_STREAM])
  return [sample_scene(rng, two_object_prob) for _ in range(n)]
