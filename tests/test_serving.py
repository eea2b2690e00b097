"""Serving engine: an image is the same whoever else is served (bit for bit), equals `Sampler` with the same seed,
for text-to-image and editing; the engine sharded over 8 devices equals one device; a request past the server's
timeout gets 504 and frees its slot."""
import dataclasses
import json
import socket
import threading
import time

import httpx
import uvicorn

import numpy as np
import pytest

from nextstep_jax import sharding
from nextstep_jax.config import tiny, tiny_vae
from nextstep_jax.sampling.pipeline import Options, Sampler
from nextstep_jax.serving.engine import Engine, EngineConfig, Request
from nextstep_jax.serving.metrics import ServingMetrics
from nextstep_jax.serving.payloads import Limits
from nextstep_jax.serving.scheduler import Scheduler
from nextstep_jax.serving.server import build_app
from nextstep_jax.serving.random_model import write_random_model_dir

SIZE, STEPS, BUCKETS = 16, 4, (64,)
T2I = dict(height=SIZE, width=SIZE, steps=STEPS, cfg_schedule="linear", prompt_buckets=BUCKETS,
           positive_prompt="good", negative_prompt="bad", decode_batches=(2,))
OPTS = Options(height=SIZE, width=SIZE, steps=STEPS, cfg_schedule="linear", positive_prompt="good",
               negative_prompt="bad", buckets=BUCKETS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  # gen_pos_embed on: the head condition depends on each slot's own token index
  return write_random_model_dir(tmp_path_factory.mktemp("serving") / "model",
                                dict(tiny(), use_gen_pos_embed=True, base_image_grid_size=8), tiny_vae())


@pytest.fixture(scope="module")
def sampler(model_dir):
  return Sampler.from_checkpoint(model_dir)


@pytest.fixture(scope="module")
def t2i_engine(sampler):
  return Engine.from_sampler(sampler, EngineConfig(slots=4, **T2I))


REQUESTS = [Request("blue ball on the left", seed=1), Request("x", seed=2, cfg=3.0), Request("green", seed=3)]


def _source_image():
  return np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _drive(engine, joins):
  """Runs the engine; `joins` = [(token step, request)]: each request joins after that many engine steps.
  Returns {request index: (tokens, image, slot)}."""
  pending = sorted(enumerate(joins), key=lambda x: x[1][0])
  owner, out, t = {}, {}, 0
  while pending or engine.active:
    while pending and pending[0][1][0] <= t and engine.free_slots:
      i, (_, req) = pending.pop(0)
      owner[engine.start(engine.prepare(req))] = i
    done = engine.step()
    t += 1
    if done:
      toks = engine.tokens(done)
      for s, tok, img in zip(done, toks, engine.decode(toks)):
        out[owner.pop(s)] = (tok, img, s)
  return out


def test_text_to_image_independent_of_other_requests_and_equal_to_sampler(t2i_engine, sampler):
  target = Request("a red cube", seed=11, cfg=5.0)
  alone = _drive(t2i_engine, [(0, target)])[0]
  # the target joins mid-image of two others, in slot 2; one leaves and another joins while it runs
  mixed = _drive(t2i_engine, [(0, REQUESTS[0]), (2, REQUESTS[1]), (3, target), (5, REQUESTS[2])])
  assert mixed[2][2] != alone[2], "the target should get another slot in the mixed run"
  np.testing.assert_array_equal(mixed[2][0], alone[0])
  np.testing.assert_array_equal(mixed[2][1], alone[1])
  for req, (tok, img, _) in [(target, alone), (REQUESTS[1], mixed[1])]:
    ref = sampler.text_to_image(req.prompt, dataclasses.replace(OPTS, cfg=req.cfg, seed=req.seed))
    assert np.abs(ref.tokens[0] - tok).max() <= 1e-4
    assert np.abs(ref.images[0].astype(int) - img.astype(int)).max() <= 1
  assert not np.allclose(alone[0], mixed[0][0]), "different requests must give different tokens"


def test_edit_independent_of_other_requests_and_equal_to_sampler(sampler):
  cfg_img = 2.0
  engine = Engine.from_sampler(sampler, EngineConfig(slots=2, mode="edit", **T2I))
  src = _source_image()
  target = Request("<image>make it blue", seed=5, cfg=4.0, cfg_img=cfg_img, image=src)
  other = Request("<image>turn it around", seed=8, image=src[::-1].copy())
  alone = _drive(engine, [(0, target)])[0]
  mixed = _drive(engine, [(0, other), (3, target)])
  np.testing.assert_array_equal(mixed[1][0], alone[0])
  np.testing.assert_array_equal(mixed[1][1], alone[1])
  ref = sampler.edit(target.prompt, src, dataclasses.replace(OPTS, cfg=4.0, cfg_img=cfg_img, seed=5, buckets=tuple(
      b + SIZE * SIZE // 16 for b in BUCKETS)))
  assert np.abs(ref.tokens[0] - alone[0]).max() <= 1e-4
  assert np.abs(ref.images[0].astype(int) - alone[1].astype(int)).max() <= 1


def test_sharded_engine_equals_single_device(model_dir, t2i_engine):
  single, _ = t2i_engine.generate(REQUESTS)
  mesh = sharding.mesh_from_shape((2, 2, 2))
  engine = Engine.from_sampler(Sampler.from_checkpoint(model_dir, mesh=mesh), t2i_engine.config)
  assert len(engine.state.h_last.sharding.device_set) == 8
  sharded, _ = engine.generate(REQUESTS)
  assert np.abs(sharded - single).max() <= 1e-4


def test_request_past_the_timeout_is_504_and_frees_its_slots(t2i_engine):
  """The real app on uvicorn (in a thread) with a 1 ms request timeout: 4 images cannot finish → 504 with one JSON
  line; the scheduler cancels them, so the slots and the queue empty."""
  metrics = ServingMetrics(t2i_engine.config.slots)
  scheduler = Scheduler({"t2i": t2i_engine}, max_queue=8, metrics=metrics).start()
  app = build_app(scheduler, Limits(width=SIZE, height=SIZE, steps=STEPS, max_n=4), 0.001, metrics)
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  try:
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while not server.started:
      assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
      time.sleep(0.05)
    r = httpx.post(url + "/v1/images/generations", json={"prompt": "a", "n": 4, "seed": 1}, timeout=60)
    assert r.status_code == 504, r.text
    assert "\n" not in r.text.strip() and "did not finish within 0.001 s" in json.loads(r.text)["error"]["message"]
    deadline = time.time() + 60
    while scheduler.active_slots or scheduler.queue_depth:
      assert time.time() < deadline, "the timed-out request's images still hold slots"
      time.sleep(0.05)
  finally:
    server.should_exit = True
    thread.join(30)
    scheduler.stop(30)
  assert not t2i_engine.active
