"""Synthetic shapes world: rendering geometry, layout invariants, captions, determinism."""
import json
import math

import numpy as np
import pytest

from nextstep_jax.data import shapes
from nextstep_jax.data.shapes import Scene, ShapeSpec

PALETTE = {"red", "green", "blue", "yellow"}
KINDS = {"circle", "square", "triangle"}
RELATIONS = {"above", "below", "to the left of", "to the right of"}


def _one(color, kind, cx, cy, size):
  obj = ShapeSpec(color, kind, cx, cy, size)
  return Scene((obj,), None, f"a {color} {kind}")


def _is_color(img, rgb):
  return np.all(img == np.asarray(rgb, np.uint8), axis=-1)


def test_palette_is_distinct_and_far_from_background():
  assert set(shapes.COLORS) == PALETTE and set(shapes.KINDS) == KINDS and set(shapes.RELATIONS) == RELATIONS
  cols = {k: np.asarray(v, float) for k, v in shapes.COLORS.items()}
  bg = np.asarray(shapes.BACKGROUND, float)
  for name, c in cols.items():
    assert np.linalg.norm(c - bg) > 150, name
    for other, d in cols.items():
      if other != name:
        assert np.linalg.norm(c - d) > 100, (name, other)


def test_render_square_covers_exact_pixels():
  # a square of half the side centred at the middle covers pixels 16..47 exactly at 64×64
  img = shapes.render(_one("blue", "square", 0.5, 0.5, 0.5), 64)
  assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
  inside = np.zeros((64, 64), bool)
  inside[16:48, 16:48] = True
  assert _is_color(img, shapes.COLORS["blue"])[inside].all()
  assert _is_color(img, shapes.BACKGROUND)[~inside].all()


@pytest.mark.parametrize("kind,area", [("circle", math.pi / 4), ("triangle", 0.5), ("square", 1.0)])
def test_render_area_matches_geometry(kind, area):
  size, side = 128, 0.5
  img = shapes.render(_one("red", kind, 0.5, 0.5, side), size).astype(float)
  bg, col = np.asarray(shapes.BACKGROUND, float), np.asarray(shapes.COLORS["red"], float)
  coverage = ((img - bg) @ (col - bg)) / ((col - bg) @ (col - bg))  # anti-aliased fractional coverage
  assert coverage.sum() / size**2 == pytest.approx(area * side**2, rel=0.01)


def test_triangle_points_up_and_circle_is_round():
  img = shapes.render(_one("green", "triangle", 0.5, 0.5, 0.5), 64)
  widths = _is_color(img, shapes.COLORS["green"]).sum(axis=1)[16:48]
  assert widths[2] < widths[16] < widths[-2]  # narrow apex at the top, wide base at the bottom
  circ = _is_color(shapes.render(_one("green", "circle", 0.5, 0.5, 0.5), 64), shapes.COLORS["green"])
  assert not circ[16, 16] and not circ[47, 47] and circ[32, 17] and circ[17, 32]  # corners empty, edges filled


def test_render_places_objects_at_their_relative_positions():
  a = ShapeSpec("red", "square", 0.25, 0.25, 0.25)
  b = ShapeSpec("yellow", "circle", 0.75, 0.75, 0.25)
  img = shapes.render(Scene((a, b), "above", "a red square above a yellow circle"), 64)
  assert _is_color(img, shapes.COLORS["red"])[16, 16] and _is_color(img, shapes.COLORS["yellow"])[48, 48]
  assert _is_color(img, shapes.BACKGROUND)[16, 48] and _is_color(img, shapes.BACKGROUND)[48, 16]


def test_captions():
  a = ShapeSpec("red", "circle", 0.3, 0.3, 0.3)
  b = ShapeSpec("blue", "square", 0.7, 0.7, 0.3)
  assert shapes.make_caption((a,), None) == "a red circle"
  assert shapes.make_caption((a, b), "above") == "a red circle above a blue square"
  assert shapes.make_caption((b, a), "to the left of") == "a blue square to the left of a red circle"
  with pytest.raises(ValueError):
    shapes.make_caption((a, b), None)
  with pytest.raises(ValueError):
    shapes.make_caption((a,), "above")


def _boxes(o):
  h = o.size / 2
  return o.cx - h, o.cy - h, o.cx + h, o.cy + h


def test_sampled_layouts_are_unambiguous():
  rng = np.random.default_rng(123)
  scenes = [shapes.sample_scene(rng) for _ in range(3000)]
  two = [s for s in scenes if len(s.objects) == 2]
  assert 0.65 < len(two) / len(scenes) < 0.75
  seen = set()
  for s in scenes:
    assert s.caption == shapes.make_caption(s.objects, s.relation)
    for o in s.objects:
      seen.update([o.color, o.kind])
      x0, y0, x1, y1 = _boxes(o)
      assert min(x0, y0) >= 0.03 and max(x1, y1) <= 0.97, s  # fully inside, with a margin
      assert o.size >= 0.18, s  # >= 11.5 px at 64², > one 8×8 VAE cell
  seen.update(s.relation for s in two)
  assert seen == PALETTE | KINDS | RELATIONS
  for s in two:
    a, b = s.objects
    assert (a.color, a.kind) != (b.color, b.kind)
    ax0, ay0, ax1, ay1 = _boxes(a)
    bx0, by0, bx1, by1 = _boxes(b)
    # free gap along the relation axis, measured between the objects' bounding boxes
    gap = {"above": by0 - ay1, "below": ay0 - by1, "to the left of": bx0 - ax1, "to the right of": ax0 - bx1}
    assert gap[s.relation] >= 0.06, s
    along = abs(a.cy - b.cy) if s.relation in ("above", "below") else abs(a.cx - b.cx)
    cross = abs(a.cx - b.cx) if s.relation in ("above", "below") else abs(a.cy - b.cy)
    assert cross <= 0.5 * along, s  # the relation is the dominant direction


def test_make_example_is_deterministic_per_seed_and_index():
  a, b = shapes.make_example(5, seed=3), shapes.make_example(5, seed=3)
  assert a["caption"] == b["caption"] and a["scene"] == b["scene"] and np.array_equal(a["image"], b["image"])
  assert a["image"].shape == (64, 64, 3) and a["image"].dtype == np.uint8
  captions = {shapes.make_example(i, seed=3)["caption"] for i in range(40)}
  assert len(captions) > 20  # indexes give different scenes
  other_seed = [shapes.make_example(i, seed=4)["scene"] for i in range(10)]
  assert other_seed != [shapes.make_example(i, seed=3)["scene"] for i in range(10)]
  big = shapes.make_example(5, seed=3, size=128)
  assert big["scene"] == a["scene"] and big["image"].shape == (128, 128, 3)
  scene = Scene.from_json(a["scene"])
  assert scene.caption == a["caption"]
  assert np.array_equal(shapes.render(scene, 64), a["image"])


def test_scene_json_roundtrip():
  s = shapes.sample_scene(np.random.default_rng(0), two_object_prob=1.0)
  assert Scene.from_json(s.to_json()) == s
  d = json.loads(s.to_json())
  assert d["caption"] == s.caption and len(d["objects"]) == 2


def test_scene_from_caption_parses_every_caption():
  space = shapes.caption_space()
  assert len(space) == len(set(space)) == 4 * 3 + (4 * 3) * (4 * 3 - 1) * 4
  parsed = shapes.scene_from_caption("a yellow triangle to the right of a green circle")
  assert [(o.color, o.kind) for o in parsed.objects] == [("yellow", "triangle"), ("green", "circle")]
  assert parsed.relation == "to the right of" and math.isnan(parsed.objects[0].cx)
  single = shapes.scene_from_caption("a blue square")
  assert [(o.color, o.kind) for o in single.objects] == [("blue", "square")] and single.relation is None
  for caption in space:
    s = shapes.scene_from_caption(caption)
    assert shapes.make_caption(s.objects, s.relation) == caption
  for bad in ("a purple circle", "a red hexagon", "a red circle near a blue square", "red circle", ""):
    with pytest.raises(ValueError):
      shapes.scene_from_caption(bad)


def test_held_out_prompts():
  p = shapes.held_out_prompts(50, seed=0)
  assert p == shapes.held_out_prompts(50, seed=0) and len(p) == 50
  assert p != shapes.held_out_prompts(50, seed=1)
  assert p != [shapes.make_example(i, seed=0)["caption"] for i in range(50)]  # not the training stream
  space = set(shapes.caption_space())
  assert all(c in space for c in p)
  n_two = sum(shapes.scene_from_caption(c).relation is not None for c in p)
  assert 20 < n_two < 50
