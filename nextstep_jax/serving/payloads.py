"""OpenAI Images API request bodies → engine `Request`s, validated at the edge (every problem: `BadRequest`).

Accepted: `prompt`, `n`, `size` ("WIDTHxHEIGHT", the served size or "auto"), `response_format` ("b64_json"),
plus our `seed`, `cfg`, `cfg_img`, `negative_prompt`, `steps` (must equal the served steps). Image i of a
request uses seed + i (default seed: random). OpenAI fields we cannot honour are refused, others ignored.
"""
from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Any

from nextstep_jax.serving.engine import Request

MAX_PROMPT_CHARS = 4000
REFUSED = {"stream": "streaming responses are not supported", "mask": "masked edits are not supported"}


class BadRequest(ValueError):
  """A request the server refuses with 400; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Limits:
  width: int
  height: int
  steps: int
  max_n: int


def _number(body: dict, name: str, default: float) -> float:
  v = body.get(name, default)
  if isinstance(v, str):
    try:
      v = float(v)
    except ValueError:
      raise BadRequest(f"{name}={v!r} is not a number") from None
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise BadRequest(f"{name}={v!r} must be a finite number")
  return float(v)


def _integer(body: dict, name: str, default: int | None) -> int | None:
  v = body.get(name, default)
  if v is None:
    return None
  if isinstance(v, str) and v.strip().lstrip("-").isdigit():
    v = int(v)
  if isinstance(v, float) and math.isfinite(v) and v.is_integer():
    v = int(v)
  if isinstance(v, bool) or not isinstance(v, int):
    raise BadRequest(f"{name}={v!r} must be an integer")
  return v


def _text(body: dict, name: str, required: bool) -> str | None:
  v = body.get(name)
  if v is None and not required:
    return None
  if not isinstance(v, str) or (required and not v.strip()):
    raise BadRequest(f"{name} must be a non-empty string")
  if len(v) > MAX_PROMPT_CHARS:
    raise BadRequest(f"{name} is {len(v)} characters long; at most {MAX_PROMPT_CHARS}")
  return v


def parse(body: Any, limits: Limits, image: Any = None) -> list[Request]:
  """The request's images as engine Requests (n of them, seeds seed … seed + n − 1)."""
  if not isinstance(body, dict):
    raise BadRequest("the request body must be a JSON object")
  for name, why in REFUSED.items():
    if body.get(name) not in (None, False, "false"):
      raise BadRequest(f"{name}: {why}")
  prompt = _text(body, "prompt", required=True)
  n = _integer(body, "n", 1)
  if not 1 <= n <= limits.max_n:
    raise BadRequest(f"n={n} must be between 1 and {limits.max_n}")
  size = body.get("size") or "auto"
  served = f"{limits.width}x{limits.height}"
  if size not in ("auto", served):
    raise BadRequest(f"size={size!r} is not served; this server generates {served} (WIDTHxHEIGHT) only")
  fmt = body.get("response_format") or "b64_json"
  if fmt != "b64_json":
    raise BadRequest(f"response_format={fmt!r} is not supported; use b64_json")
  steps = _integer(body, "steps", limits.steps)
  if steps != limits.steps:
    raise BadRequest(f"steps={steps}: this server samples with {limits.steps} steps (fixed at start-up)")
  seed = _integer(body, "seed", None)
  if seed is None:
    seed = secrets.randbelow(2**31)
  if not 0 <= seed < 2**63 - n:
    raise BadRequest(f"seed={seed} must be in [0, 2^63)")
  cfg, cfg_img = _number(body, "cfg", 7.5), _number(body, "cfg_img", 2.0)
  for name, v in (("cfg", cfg), ("cfg_img", cfg_img)):
    if not 1 <= v <= 100:
      raise BadRequest(f"{name}={v} must be in [1, 100] (1 disables guidance)")
  negative = _text(body, "negative_prompt", required=False)
  return [Request(prompt, seed + i, cfg, cfg_img, negative, image=image) for i in range(n)]
