"""Prometheus metrics of the server (`GET /metrics`): queue depth, slots, image tokens, request latency."""
from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
RATE_WINDOW_S = 10.0


class ServingMetrics:
  def __init__(self, slots: int):
    self.registry = r = CollectorRegistry()
    self.queue_depth = Gauge("nextstep_queue_depth", "requests waiting for a slot", registry=r)
    self.active = Gauge("nextstep_active_slots", "slots generating an image", registry=r)
    Gauge("nextstep_slots", "decode slots", registry=r).set(slots)
    self.tokens_total = Counter("nextstep_image_tokens", "image tokens sampled", registry=r)
    self.rate = Gauge("nextstep_image_tokens_per_second", f"image tokens/s over the last {RATE_WINDOW_S:.0f} s",
                      registry=r)
    self.latency = Histogram("nextstep_request_latency_seconds", "queue + generation time per image",
                             buckets=LATENCY_BUCKETS, registry=r)
    self.requests = Counter("nextstep_images", "images by outcome", ["status"], registry=r)
    self._window: collections.deque[tuple[float, int]] = collections.deque()

  def tokens(self, count: int, _step_s: float) -> None:
    now = time.perf_counter()
    self.tokens_total.inc(count)
    self._window.append((now, count))
    while self._window and self._window[0][0] < now - RATE_WINDOW_S:
      self._window.popleft()
    span = max(now - self._window[0][0], 1e-3) if len(self._window) > 1 else RATE_WINDOW_S
    self.rate.set(sum(c for _, c in self._window) / span)

  def request_done(self, status: str, seconds: float) -> None:
    self.requests.labels(status).inc()
    if status == "ok":
      self.latency.observe(seconds)

  def gauges(self, queue_depth: int, active: int) -> None:
    self.queue_depth.set(queue_depth)
    self.active.set(active)

  def render(self) -> bytes:
    return generate_latest(self.registry)
