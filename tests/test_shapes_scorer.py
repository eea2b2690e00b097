"""Mini-GenEval: accuracy on ground-truth renders (clean and degraded), rejection of wrong images, components."""
import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from nextstep_jax.data import shapes
from nextstep_jax.data.shapes import Scene, ShapeSpec
from nextstep_jax.eval import shapes_scorer as sc

OPPOSITE = {"above": "below", "below": "above", "to the left of": "to the right of",
            "to the right of": "to the left of"}


def _examples(n, size, seed=11):
  return [shapes.make_example(i, seed=seed, size=size) for i in range(n)]


def _gaussian_blur(img, sigma):
  """Separable Gaussian blur (edge-replicated) of a uint8 image, in float."""
  r = int(np.ceil(3 * sigma))
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  k /= k.sum()
  out = img.astype(np.float64)
  for axis in (0, 1):
    pad = [(r, r) if a == axis else (0, 0) for a in range(3)]
    padded = np.pad(out, pad, mode="edge")
    out = sum(k[i] * np.take(padded, np.arange(i, i + img.shape[axis]), axis=axis) for i in range(2 * r + 1))
  return out


def _noisy(img, std, rng):
  return np.clip(np.round(np.asarray(img, np.float64) + rng.normal(0, std, img.shape)), 0, 255).astype(np.uint8)


def _jpeg(img, quality):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=quality)
  return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("size", [32, 64, 128])
def test_ground_truth_scores_fully_correct(size):
  ex = _examples(200, size)
  result = sc.score_batch([e["image"] for e in ex], [e["caption"] for e in ex])
  assert result["n"] == 200 and 100 < result["n_relation"] < 200
  assert result["fully_correct"] >= 0.95, result
  assert result["fully_correct_single"] >= 0.95 and result["fully_correct_two"] >= 0.95, result
  for key in ("color", "count", "position"):
    assert result[key] >= 0.98, (key, result)


def test_degraded_ground_truth_still_scores():
  ex = _examples(200, 64, seed=12)
  rng = np.random.default_rng(0)
  caps = [e["caption"] for e in ex]
  blurred = [_noisy(_gaussian_blur(e["image"], 1.0), 8.0, rng) for e in ex]
  assert sc.score_batch(blurred, caps)["fully_correct"] >= 0.90
  jpeg = [_jpeg(_noisy(e["image"], 4.0, rng), 75) for e in ex]
  assert sc.score_batch(jpeg, caps)["fully_correct"] >= 0.90


def test_float_images_in_unit_range_are_accepted():
  e = shapes.make_example(3, seed=1)
  as_float = e["image"].astype(np.float32) / 255.0
  assert sc.detect(as_float) == sc.detect(e["image"])
  assert sc.score_image(as_float, e["caption"])["fully_correct"]


def test_detect_reports_colour_kind_and_position():
  objs = (ShapeSpec("green", "triangle", 0.3, 0.7, 0.3), ShapeSpec("blue", "circle", 0.75, 0.25, 0.3),
          ShapeSpec("red", "square", 0.2, 0.2, 0.25))
  img = shapes.render(Scene(objs, None, "three shapes"), 64)
  dets = sorted(sc.detect(img), key=lambda d: d.color)
  assert [(d.color, d.kind) for d in dets] == [("blue", "circle"), ("green", "triangle"), ("red", "square")]
  for d, (cx, cy, s) in zip(dets, [(0.75, 0.25, 0.3), (0.3, 0.7, 0.3), (0.2, 0.2, 0.25)]):
    assert abs(d.cx - cx) <= 1.5 / 64 and abs(d.cy - cy) <= 1.5 / 64
    assert abs((d.bbox[2] - d.bbox[0]) - s) <= 2 / 64
  assert dets[2].area == pytest.approx(0.25**2, abs=2 * 0.25 * 2 / 64)


def test_empty_and_grey_images_have_no_detections():
  blank = np.full((64, 64, 3), shapes.BACKGROUND, np.uint8)
  assert sc.detect(blank) == []
  rng = np.random.default_rng(1)
  assert sc.detect(_noisy(blank, 8.0, rng)) == []
  grey_square = blank.copy()
  grey_square[10:40, 10:40] = 60  # dark, colourless: not an object of the world
  assert sc.detect(grey_square) == []
  r = sc.score_image(blank, "a red circle above a blue square")
  assert not any(r[k] for k in ("color", "kind", "count", "objects", "position", "fully_correct"))


def _two_object_scenes(n, pred):
  rng = np.random.default_rng(5)
  out = []
  while len(out) < n:
    s = shapes.sample_scene(rng, two_object_prob=1.0)
    if pred(*s.objects):
      out.append(s)
  return out


@pytest.mark.parametrize("attr,other", [("color", "kind"), ("kind", "color")])
def test_swapped_attributes_are_rejected(attr, other):
  for s in _two_object_scenes(40, lambda a, b: getattr(a, attr) != getattr(b, attr)):
    a, b = s.objects
    wrong = Scene((dataclasses.replace(a, **{attr: getattr(b, attr)}),
                   dataclasses.replace(b, **{attr: getattr(a, attr)})), s.relation, "")
    r = sc.score_image(shapes.render(wrong, 64), s.caption)
    assert r["color"] and r["kind"] and r["count"] and not r["fully_correct"], (s.caption, r)
    if getattr(a, other) != getattr(b, other):
      assert not r["objects"], (s.caption, r)  # same multisets, wrong binding
    else:
      assert r["objects"] and not r["position"], (s.caption, r)  # same objects, swapped places


def test_swapped_relation_is_rejected():
  for s in _two_object_scenes(40, lambda a, b: True):
    a, b = s.objects
    wrong_caption = shapes.make_caption(s.objects, OPPOSITE[s.relation])
    img = shapes.render(s, 64)
    r = sc.score_image(img, wrong_caption)
    assert r["objects"] and r["count"] and not r["position"] and not r["fully_correct"], (wrong_caption, r)
    assert sc.score_image(img, s.caption)["fully_correct"], s.caption


def test_wrong_single_objects_are_rejected():
  img = shapes.render(Scene((ShapeSpec("red", "circle", 0.5, 0.5, 0.4),), None, "a red circle"), 64)
  assert sc.score_image(img, "a red circle")["fully_correct"]
  r = sc.score_image(img, "a blue circle")
  assert r["kind"] and not r["color"] and not r["fully_correct"]
  r = sc.score_image(img, "a red square")
  assert r["color"] and not r["kind"] and not r["fully_correct"]
  r = sc.score_image(img, "a red triangle")
  assert not r["kind"] and not r["fully_correct"]
  extra = Scene((ShapeSpec("red", "circle", 0.3, 0.3, 0.3), ShapeSpec("blue", "square", 0.75, 0.75, 0.3)),
                "above", "")
  r = sc.score_image(shapes.render(extra, 64), "a red circle")
  assert r["objects"] and not r["count"] and not r["fully_correct"]  # an extra object


def _det(cx, cy, s, color="red", kind="circle"):
  return sc.Detection(color, kind, cx, cy, (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2), s * s)


def test_relations_follow_geneval_rule():
  assert sc.relations_between(_det(0.5, 0.2, 0.2), _det(0.5, 0.8, 0.2)) == {"above"}
  assert sc.relations_between(_det(0.5, 0.8, 0.2), _det(0.5, 0.2, 0.2)) == {"below"}
  assert sc.relations_between(_det(0.2, 0.5, 0.2), _det(0.8, 0.55, 0.2)) == {"to the left of"}
  assert sc.relations_between(_det(0.8, 0.5, 0.2), _det(0.2, 0.45, 0.2)) == {"to the right of"}
  # diagonal at 45°: the revised offset (0.3 − 0.1·0.4 = 0.26 per axis over norm 0.42) is 0.61 on both axes
  assert sc.relations_between(_det(0.2, 0.2, 0.2), _det(0.5, 0.5, 0.2)) == {"above", "to the left of"}
  # centres 0.05 apart with 0.4 of summed box size: offset within the 10 % threshold → no relation
  assert sc.relations_between(_det(0.5, 0.5, 0.2), _det(0.5, 0.55, 0.2)) == set()


def test_score_batch_aggregates():
  good = shapes.render(Scene((ShapeSpec("red", "circle", 0.5, 0.3, 0.3),
                              ShapeSpec("blue", "square", 0.5, 0.75, 0.3)), "above", ""), 64)
  single = shapes.render(Scene((ShapeSpec("yellow", "triangle", 0.5, 0.5, 0.4),), None, ""), 64)
  blank = np.full((64, 64, 3), shapes.BACKGROUND, np.uint8)
  caps = ["a red circle above a blue square", "a red circle below a blue square", "a yellow triangle",
          "a green square"]
  r = sc.score_batch([good, good, single, blank], caps)
  assert r["n"] == 4 and r["n_relation"] == 2
  assert r["fully_correct"] == pytest.approx(2 / 4)
  assert r["position"] == pytest.approx(1 / 2)  # relational prompts only
  assert r["fully_correct_two"] == pytest.approx(1 / 2) and r["fully_correct_single"] == pytest.approx(1 / 2)
  assert r["color"] == pytest.approx(3 / 4) and r["count"] == pytest.approx(3 / 4)
  with pytest.raises(ValueError):
    sc.score_batch([good], caps)


def test_label_components_hand_made():
  a = np.array([
      [1, 1, 0, 2, 0, 0],
      [0, 0, 1, 2, 0, 1],  # (1,2) joins (0,1) diagonally; class 2 never merges with class 1
      [3, 0, 0, 0, 0, 1],
      [0, 3, 0, 1, 1, 0],  # (3,1) joins (2,0) diagonally; (3,4) joins (2,5) diagonally
  ])
  labels, comp, runs = sc.label_components(a)
  assert labels.max() == 4
  groups = {tuple(map(tuple, np.argwhere(labels == k))) for k in range(1, 5)}
  assert groups == {((0, 0), (0, 1), (1, 2)), ((0, 3), (1, 3)), ((2, 0), (3, 1)), ((1, 5), (2, 5), (3, 3), (3, 4))}
  assert (labels == 0).sum() == (a == 0).sum()


def test_label_components_matches_scipy():
  ndimage = pytest.importorskip("scipy.ndimage")
  rng = np.random.default_rng(0)
  for trial in range(20):
    a = rng.integers(0, 3, size=(23, 31)) * (rng.random((23, 31)) < 0.55)
    labels, _, _ = sc.label_components(a)
    n_ref = 0
    for v in (1, 2):
      ref, n = ndimage.label(a == v, structure=np.ones((3, 3)))
      n_ref += n
      pairs = {(int(x), int(y)) for x, y in zip(labels[a == v], ref[a == v])}
      assert len(pairs) == n == len({x for x, _ in pairs}), trial  # a bijection between labellings
    assert labels.max() == n_ref
