"""Aspect-ratio buckets: the official list, its ×2 scaling at 512 px, the fixed mode, nearest-bucket choice."""
import pytest

from nextstep_jax.data.buckets import HW_ASPECT_RATIOS, bucket_grids, nearest_bucket


def test_official_list_and_scaling():
  official = [(8, 32), (9, 28), (10, 25), (11, 23), (12, 21), (13, 19), (14, 18), (15, 17), (16, 16)]
  assert list(HW_ASPECT_RATIOS) == official + [(w, h) for h, w in reversed(official[:-1])]
  assert bucket_grids(256) == HW_ASPECT_RATIOS
  g512 = bucket_grids(512)
  assert (32, 32) in g512 and (16, 64) in g512 and (64, 16) in g512 and len(g512) == 17
  assert bucket_grids(512, mode="fixed") == ((32, 32),)
  assert bucket_grids(64, down_factor=4) == HW_ASPECT_RATIOS  # tiny VAE f2 × patch 2: 16 tokens per side
  assert bucket_grids(16, down_factor=4, mode="fixed") == ((4, 4),)


def test_bucket_errors():
  with pytest.raises(ValueError, match="not a positive multiple of the token size 16"):
    bucket_grids(250)
  with pytest.raises(ValueError, match="multiple of 16; use resolution 256 or buckets='fixed'"):
    bucket_grids(384)
  with pytest.raises(ValueError, match="bucket mode"):
    bucket_grids(256, mode="square")


def test_nearest_bucket():
  grids = bucket_grids(256)
  assert nearest_bucket(512, 512, grids) == (16, 16)
  assert nearest_bucket(100, 400, grids) == (8, 32)  # 1:4, the widest bucket
  assert nearest_bucket(1000, 100, grids) == (32, 8)  # more extreme than any bucket → the tallest
  # 1:2 → ln ratio −0.693: 11×23 (−0.737, off 0.044) beats 12×21 (−0.560, off 0.134)
  assert nearest_bucket(64, 128, grids) == (11, 23)
  # 3:4 (−0.288): 14×18 (−0.251, off 0.036) beats 13×19 (−0.379, off 0.091)
  assert nearest_bucket(300, 400, grids) == (14, 18)
  assert nearest_bucket(37, 91, ((4, 4),)) == (4, 4)
