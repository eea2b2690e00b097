"""`nextstep-jax serve` as a real process on localhost: the official `openai` client generates and edits; faults
(disconnect frees the slot, 429 with Retry-After, every bad request → 400 with one JSON line, SIGTERM drains
in-flight requests and exits 0)."""
import base64
import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, subprocess_env
from nextstep_jax.config import tiny, tiny_vae
from nextstep_jax.serving.random_model import write_random_model_dir

pytestmark = pytest.mark.xdist_group("server")
SIZE = 64  # 16×16 = 256 image tokens with the tiny VAE: an image takes a noticeable time, so faults land mid-image
START_TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  model = write_random_model_dir(tmp_path_factory.mktemp("server") / "model",
                                 dict(tiny(), use_gen_pos_embed=True, base_image_grid_size=16), tiny_vae())
  port = _free_port()
  log = open(tmp_path_factory.mktemp("server_log") / "serve.log", "w+")
  proc = subprocess.Popen(
      [sys.executable, "-m", "nextstep_jax.cli", "serve", "--checkpoint", str(model), "--slots", "1",
       "--edit-slots", "1", "--size", f"{SIZE}x{SIZE}", "--steps", "50", "--port", str(port), "--prompt-buckets",
       "64", "--positive-prompt", "good", "--negative-prompt", "bad", "--max-queue", "4", "--max-n", "4"],
      cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + START_TIMEOUT_S
  while True:
    assert proc.poll() is None, f"server exited with {proc.returncode}: {_tail(log)}"
    try:
      if httpx.get(url + "/healthz", timeout=1).status_code == 200:
        break
    except httpx.TransportError:
      pass
    assert time.time() < deadline, f"server did not start in {START_TIMEOUT_S} s: {_tail(log)}"
    time.sleep(0.25)
  yield dict(url=url, proc=proc, log=log)
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def _tail(log) -> str:
  log.flush()
  log.seek(0)
  return log.read()[-3000:]


def _png(b64: str) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def _metric(url: str, name: str) -> float:
  text = httpx.get(url + "/metrics", timeout=5).text
  m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
  return float(m.group(1)) if m else 0.0


def test_openai_client_generates_and_edits(server):
  from openai import OpenAI
  client = OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)
  out = client.images.generate(prompt="a red cube", n=2, size=f"{SIZE}x{SIZE}", response_format="b64_json",
                               extra_body={"seed": 3, "cfg": 4.0})
  a, b = (_png(d.b64_json) for d in out.data)
  assert a.shape == (SIZE, SIZE, 3) and not np.array_equal(a, b)  # image i uses seed + i
  again = client.images.generate(prompt="a red cube", size=f"{SIZE}x{SIZE}", response_format="b64_json",
                                 extra_body={"seed": 4, "cfg": 4.0})
  np.testing.assert_array_equal(_png(again.data[0].b64_json), b)
  src = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(src, "PNG")
  edit = client.images.edit(image=("src.png", src.getvalue(), "image/png"), prompt="make it blue", n=1,
                            size=f"{SIZE}x{SIZE}", response_format="b64_json", extra_body={"seed": 1})
  assert _png(edit.data[0].b64_json).shape == (SIZE, SIZE, 3)
  assert _metric(server["url"], "nextstep_image_tokens_total") >= 4 * (SIZE // 4) ** 2


GENERATION_ERRORS = [
    ({"prompt": ""}, "prompt"), ({"prompt": "a", "n": 5}, "n=5"), ({"prompt": "a", "size": "1024x1024"}, "size"),
    ({"prompt": "a", "cfg": float("nan")}, "cfg"), ({"prompt": "a", "cfg": "high"}, "cfg"),
    ({"prompt": "a", "cfg": 1e400}, "cfg"), ({"prompt": "a" * 5000}, "prompt"), ({"prompt": "b" * 200}, "too long"),
    ({"prompt": "a", "response_format": "url"}, "response_format"), ({"prompt": "a", "steps": 7}, "steps"),
    ({"prompt": "a", "seed": -1}, "seed"), ({"prompt": "a", "stream": True}, "stream"), ([1, 2], "JSON object"),
]


@pytest.mark.parametrize("body,needle", GENERATION_ERRORS, ids=[n for _, n in GENERATION_ERRORS])
def test_bad_generation_request_is_400_with_one_line(server, body, needle):
  r = httpx.post(server["url"] + "/v1/images/generations", content=json.dumps(body), timeout=30)
  _assert_one_line_400(r, needle)


def test_bad_bodies_and_uploads_are_400_with_one_line(server):
  url = server["url"] + "/v1/images"
  _assert_one_line_400(httpx.post(url + "/generations", content=b"{not json", timeout=30), "not valid JSON")
  _assert_one_line_400(httpx.post(url + "/edits", files={"image": ("a.png", b"GIF89a-not-really", "image/png")},
                                  data={"prompt": "x"}, timeout=30), "not a readable image")
  _assert_one_line_400(httpx.post(url + "/edits", data={"prompt": "x"}, files={"other": ("a", b"1")}, timeout=30),
                       "exactly one image")
  _assert_one_line_400(httpx.post(url + "/edits", content=b"plain", timeout=30), "multipart")


def _assert_one_line_400(r, needle):
  assert r.status_code == 400, r.text
  text = r.text.strip()
  assert "\n" not in text and "Traceback" not in text
  assert needle in json.loads(text)["error"]["message"]


def test_queue_full_is_429_with_retry_after(server):
  url = server["url"] + "/v1/images/generations"
  results = []

  def call():  # 4 queue places: the first request's 4 images take them, the others are refused
    results.append(httpx.post(url, json={"prompt": "a", "n": 4, "seed": 1}, timeout=120))
  threads = [threading.Thread(target=call) for _ in range(3)]
  for t in threads:
    t.start()
    time.sleep(0.05)
  for t in threads:
    t.join()
  codes = sorted(r.status_code for r in results)
  assert codes[0] == 200 and 429 in codes, codes
  refused = next(r for r in results if r.status_code == 429)
  assert int(refused.headers["Retry-After"]) >= 1 and "queue is full" in refused.json()["error"]["message"]


def test_disconnect_frees_the_slot(server):
  url = server["url"]
  before = _metric(url, 'nextstep_images_total{status="cancelled"}')
  with pytest.raises(httpx.ReadTimeout):  # the client gives up mid-request and closes the connection
    httpx.post(url + "/v1/images/generations", json={"prompt": "a", "n": 4}, timeout=httpx.Timeout(30, read=0.3))
  deadline = time.time() + 30
  while _metric(url, 'nextstep_images_total{status="cancelled"}') <= before or _metric(
      url, "nextstep_active_slots") or _metric(url, "nextstep_queue_depth"):
    assert time.time() < deadline, "the disconnected request's images were not cancelled"
    time.sleep(0.1)
  r = httpx.post(url + "/v1/images/generations", json={"prompt": "next", "seed": 2}, timeout=120)
  assert r.status_code == 200 and len(r.json()["data"]) == 1


def test_sigterm_drains_in_flight_requests_and_exits_0(server):
  url, proc = server["url"], server["proc"]
  result = {}
  worker = threading.Thread(target=lambda: result.update(r=httpx.post(
      url + "/v1/images/generations", json={"prompt": "last one", "n": 2}, timeout=120)))
  worker.start()
  deadline = time.time() + 30
  while not _metric(url, "nextstep_active_slots"):
    assert time.time() < deadline
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.5)
  with pytest.raises(httpx.TransportError):  # no longer accepting
    httpx.post(url + "/v1/images/generations", json={"prompt": "late"}, timeout=5)
  worker.join()
  assert result["r"].status_code == 200 and len(result["r"].json()["data"]) == 2
  assert proc.wait(60) == 0, _tail(server["log"])
