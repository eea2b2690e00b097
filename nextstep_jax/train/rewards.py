"""Rewards for on-policy RL (`train/grpo.py`): a callable `(prompts, uint8 images (N, H, W, 3)) → scores (N,)`.

`load_reward(spec)` turns `config.grpo.reward` into one:
  "shapes"              the demo's shapes evaluator (`eval/shapes_scorer.py`): ½·fully_correct + ½·the mean of the
                        colour / kind / count / objects / position verdicts (a dense score in [0, 1])
  "http://host:port/p"  `HttpReward`: a reward model in its own process (PickScore, an OCR scorer, …); the JSON
                        request/response format is in docs/GRPO.md (`RewardServer` serves any callable that way)
  "package.module:fn"   any importable callable with the signature above
"""
from __future__ import annotations

import base64
import importlib
import io
import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from nextstep_jax.config import ConfigError
from nextstep_jax.eval.shapes_scorer import score_image

RewardFn = Callable[[Sequence[str], np.ndarray], np.ndarray]
SHAPES_VERDICTS = ("color", "kind", "count", "objects", "position")


class RewardError(RuntimeError):
  """A reward service or callable that failed or answered something unusable."""


def check_scores(scores, n: int, source: str) -> np.ndarray:
  """`scores` as a finite float32 (n,) array, or one RewardError line naming `source`."""
  try:
    out = np.asarray(scores, np.float32).reshape(-1)
  except (TypeError, ValueError):
    raise RewardError(f"reward {source} returned {type(scores).__name__}, not a list of numbers") from None
  if out.shape != (n,):
    raise RewardError(f"reward {source} returned {out.size} scores for {n} images; return one score per image")
  if not np.all(np.isfinite(out)):
    raise RewardError(f"reward {source} returned non-finite scores {out[~np.isfinite(out)][:4]}; return finite numbers")
  return out


def shapes_reward(prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
  """The demo's built-in reward (module docstring)."""
  out = []
  for image, caption in zip(images, prompts):
    v = score_image(image, caption)
    out.append(0.5 * float(v["fully_correct"]) + 0.5 * float(np.mean([v[k] for k in SHAPES_VERDICTS])))
  return np.asarray(out, np.float32)


# ----------------------------------------------------------------------------------------------- HTTP


def encode_png(image: np.ndarray) -> str:
  """uint8 (H, W, 3) → base64 PNG text."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(text: str) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"))


class HttpReward:
  """Client of a reward service: POST {"prompts": [str], "images": [base64 PNG]} → {"scores": [float]}."""

  def __init__(self, url: str, timeout_s: float = 120.0):
    self.url, self.timeout_s = url, timeout_s

  def __call__(self, prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
    body = json.dumps({"prompts": list(prompts), "images": [encode_png(im) for im in images]}).encode()
    req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
        answer = json.loads(resp.read())
    except urllib.error.HTTPError as e:
      raise RewardError(f"reward service {self.url} answered HTTP {e.code}: {e.read()[:200]!r}") from None
    except (urllib.error.URLError, OSError) as e:
      raise RewardError(f"reward service {self.url} is unreachable ({e}); start it or fix config.grpo.reward") \
          from None
    except json.JSONDecodeError:
      raise RewardError(f"reward service {self.url} did not answer JSON; it must return {{\"scores\": [...]}}") \
          from None
    if not isinstance(answer, dict) or "scores" not in answer:
      raise RewardError(f"reward service {self.url} answered without a \"scores\" list: {str(answer)[:200]}")
    return check_scores(answer["scores"], len(images), self.url)


class RewardServer:
  """Serves `fn` in the HttpReward format on 127.0.0.1 (stdlib http.server, one thread): wraps a reward model
  living in another environment. `with RewardServer(fn) as srv: HttpReward(srv.url)`."""

  def __init__(self, fn: RewardFn, port: int = 0, path: str = "/score"):
    class Handler(BaseHTTPRequestHandler):
      def do_POST(self):  # noqa: N802 (http.server's name)
        if self.path != path:
          return self._send(404, {"error": f"POST {path}"})
        try:
          req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
          images = np.stack([decode_png(s) for s in req["images"]])
          scores = check_scores(fn(req["prompts"], images), len(images), "callable")
        except (KeyError, ValueError, TypeError, RewardError) as e:
          return self._send(400, {"error": str(e)})
        self._send(200, {"scores": [float(s) for s in scores]})

      def _send(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def log_message(self, *args):
        pass
    self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"
    self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self._thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ----------------------------------------------------------------------------------------------- by name


def load_reward(spec: str, timeout_s: float = 120.0) -> RewardFn:
  """`config.grpo.reward` → a reward callable (module docstring); ConfigError names a bad spec."""
  if spec == "shapes":
    return shapes_reward
  if spec.startswith(("http://", "https://")):
    return HttpReward(spec, timeout_s)
  mod, _, name = spec.partition(":")
  if not (mod and name):
    raise ConfigError(f"config.grpo.reward={spec!r} is not 'shapes', an http(s):// URL or 'package.module:function'")
  try:
    fn = getattr(importlib.import_module(mod), name)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f"config.grpo.reward={spec!r} cannot be imported ({e}); check the module path") from None
  if not callable(fn):
    raise ConfigError(f"config.grpo.reward={spec!r} is not callable")
  return fn


def brightness_reward(prompts: Sequence[str], images: np.ndarray) -> np.ndarray:
  """Mean pixel value in [0, 1] (a prompt-free reward for synthetic runs and tests)."""
  return np.asarray(images, np.float32).reshape(len(images), -1).mean(axis=1) / 255.0
