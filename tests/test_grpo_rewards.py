"""GRPO rewards (train/rewards.py): the shapes evaluator as the built-in reward (1 on ground-truth renders, lower
on wrong images), the HTTP reward path through a real local server and client, and one-line errors."""
import numpy as np
import pytest

from nextstep_jax.config import ConfigError
from nextstep_jax.data.shapes import held_out_scenes, render
from nextstep_jax.train import rewards


@pytest.fixture(scope="module")
def scenes():
  scenes = held_out_scenes(6, seed=3)
  return [s.caption for s in scenes], np.stack([render(s, 32) for s in scenes])


def test_shapes_reward_is_one_on_ground_truth_and_lower_on_a_blank(scenes):
  captions, images = scenes
  got = rewards.load_reward("shapes")(captions, images)
  blank = rewards.shapes_reward(captions, np.full_like(images, 230))
  print(f"shapes reward: ground truth {got.round(3)}, blank {blank.round(3)}")
  assert got.shape == (6,) and np.mean(got) >= 0.9 and np.all(blank < got)


def test_http_reward_round_trip_through_a_local_server(scenes):
  captions, images = scenes
  seen = {}

  def score(prompts, imgs):  # what a reward model process sees: the prompts and the decoded PNGs
    seen.update(prompts=list(prompts), images=imgs)
    return rewards.shapes_reward(prompts, imgs)
  with rewards.RewardServer(score) as srv:
    got = rewards.load_reward(srv.url, timeout_s=30)(captions, images)
  assert seen["prompts"] == captions and np.array_equal(seen["images"], images)  # PNG is lossless
  np.testing.assert_array_equal(got, rewards.shapes_reward(captions, images))


def test_http_reward_errors_are_one_line(scenes):
  captions, images = scenes
  with rewards.RewardServer(lambda p, im: [0.5]) as srv:  # one score for six images
    with pytest.raises(rewards.RewardError, match="returned 1 scores for 6 images"):
      rewards.HttpReward(srv.url)(captions, images)
    with pytest.raises(rewards.RewardError, match="HTTP 404"):
      rewards.HttpReward(srv.url.replace("/score", "/nope"))(captions, images)
  with pytest.raises(rewards.RewardError, match="unreachable"):
    rewards.HttpReward(srv.url, timeout_s=5)(captions, images)  # the server is closed now


def test_reward_specs():
  assert rewards.load_reward("nextstep_jax.train.rewards:brightness_reward") is rewards.brightness_reward
  with pytest.raises(ConfigError, match="not 'shapes'"):
    rewards.load_reward("pickscore")
  with pytest.raises(ConfigError, match="cannot be imported"):
    rewards.load_reward("no_such_module:fn")
  with pytest.raises(rewards.RewardError, match="non-finite"):
    rewards.check_scores([0.1, float("nan")], 2, "test")
