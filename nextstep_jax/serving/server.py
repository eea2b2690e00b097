"""OpenAI-compatible HTTP server (FastAPI on uvicorn) around the scheduler.

  POST /v1/images/generations   JSON {prompt, n, size, response_format=b64_json, seed, cfg, negative_prompt, steps}
  POST /v1/images/edits         multipart: image (file) + the same fields; the prompt gets a leading <image> tag
  GET  /healthz                 {"status": "ok", ...}
  GET  /metrics                 Prometheus text

Every refusal is a one-line JSON error {"error": {"message", "type", "code"}}: 400 bad input, 429 queue full
(with Retry-After), 503 shutting down, 504 past the per-request timeout. A client that disconnects cancels its
images (their slots free at the next token). uvicorn's SIGTERM handling closes the listener and waits for the
requests in flight; the scheduler then drains and the process exits 0.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import tempfile
import time
from typing import Any

import numpy as np
from PIL import Image
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from nextstep_jax.images import load_image
from nextstep_jax.serving.payloads import Limits, parse
from nextstep_jax.serving.scheduler import QueueFull, Scheduler, ShuttingDown

MAX_UPLOAD_BYTES = 20 * 2**20
DISCONNECT_POLL_S = 0.1


def error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None) -> Response:
  body = json.dumps({"error": {"message": " ".join(str(message).split()), "type": kind, "param": None,
                               "code": status}})
  return Response(body + "\n", status_code=status, media_type="application/json", headers=headers)


def png_b64(image_HxWx3: np.ndarray) -> str:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image_HxWx3, np.uint8)).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode()


def build_app(scheduler: Scheduler, limits: Limits, request_timeout_s: float, metrics: Any) -> FastAPI:
  app = FastAPI(title="nextstep-jax", docs_url=None, redoc_url=None, openapi_url=None)
  engines = scheduler.engines

  @app.exception_handler(RequestValidationError)
  async def _invalid(_req, exc):
    return error(400, f"invalid request: {exc.errors()[0].get('msg', 'bad field') if exc.errors() else exc}")

  @app.exception_handler(Exception)
  async def _internal(_req, exc):
    return error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

  @app.get("/healthz")
  async def healthz():
    if scheduler.error is not None:
      return error(503, f"engine failed: {scheduler.error}", "server_error")
    return {"status": "ok", "modes": sorted(engines), "slots": {m: e.config.slots for m, e in engines.items()},
            "active_slots": scheduler.active_slots, "queue_depth": scheduler.queue_depth}

  @app.get("/metrics")
  async def prometheus():
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

  @app.post("/v1/images/generations")
  async def generations(request: HttpRequest):
    try:
      body = json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
      return error(400, "the request body is not valid JSON")
    return await _serve(request, "t2i", body, None)

  @app.post("/v1/images/edits")
  async def edits(request: HttpRequest):
    if "edit" not in engines:
      return error(400, "this server does not serve edits (start it with --edit-slots N)")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
      return error(400, "edits must be sent as multipart/form-data (an image file and form fields)")
    try:
      form = await request.form(max_part_size=MAX_UPLOAD_BYTES)
    except Exception as e:  # malformed multipart
      return error(400, f"the request body is not a valid multipart form: {e}")
    uploads = [v for k, v in form.multi_items() if k in ("image", "image[]") and hasattr(v, "read")]
    if len(uploads) != 1:
      return error(400, f"edits take exactly one image file (field 'image'); got {len(uploads)}")
    if any(k == "mask" for k, _ in form.multi_items()):
      return error(400, "mask: masked edits are not supported")
    data = await uploads[0].read()
    if len(data) > MAX_UPLOAD_BYTES:
      return error(400, f"the image is {len(data)} bytes; at most {MAX_UPLOAD_BYTES}")
    try:
      image = _decode_image(data)
    except ValueError as e:
      return error(400, f"image: {e}")
    body = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    return await _serve(request, "edit", body, image)

  async def _serve(request: HttpRequest, mode: str, body: Any, image: Any):
    engine = engines.get(mode)
    if engine is None:
      return error(400, f"this server does not serve {mode}")
    try:
      preps = [engine.prepare(r) for r in parse(body, limits, image)]
    except ValueError as e:  # BadRequest and the engine's own checks (prompt too long, ...)
      return error(400, str(e))
    try:
      jobs = scheduler.submit(mode, preps)
    except QueueFull as e:
      return error(429, str(e), "rate_limit_error", {"Retry-After": str(e.retry_after)})
    except ShuttingDown as e:
      return error(503, str(e), "server_error")
    futures = [asyncio.wrap_future(j.future) for j in jobs]
    waiter = asyncio.ensure_future(asyncio.gather(*futures))
    watcher = asyncio.ensure_future(_disconnected(request))
    done, _ = await asyncio.wait({waiter, watcher}, timeout=request_timeout_s, return_when=asyncio.FIRST_COMPLETED)
    watcher.cancel()
    if waiter not in done:
      for j in jobs:
        scheduler.cancel(j)
      waiter.cancel()
      await asyncio.gather(waiter, return_exceptions=True)  # retrieve the cancellation (no 'never retrieved' log)
      if watcher in done:
        return Response(status_code=499)  # nobody is listening
      return error(504, f"the request did not finish within {request_timeout_s:g} s", "timeout_error")
    try:
      images = waiter.result()
    except (asyncio.CancelledError, Exception) as e:  # the engine failed
      return error(503, f"generation failed: {type(e).__name__}: {e}", "server_error")
    return {"created": int(time.time()), "data": [{"b64_json": png_b64(im)} for im in images],
            "output_format": "png", "size": f"{limits.width}x{limits.height}"}

  return app


async def _disconnected(request: HttpRequest) -> None:
  while not await request.is_disconnected():
    await asyncio.sleep(DISCONNECT_POLL_S)


def _decode_image(data: bytes) -> np.ndarray:
  with tempfile.NamedTemporaryFile(suffix=".img", delete=False) as f:
    f.write(data)
  try:
    return load_image(f.name)
  except ValueError:
    raise ValueError("the upload is not a readable image (PNG, JPEG, WebP, ...)") from None
  finally:
    os.unlink(f.name)
