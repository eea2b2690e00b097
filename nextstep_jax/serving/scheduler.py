"""The serving loop: one thread owns the engines; requests wait in a bounded queue and join slots at token
boundaries; finished images are VAE-decoded in batches and handed back through futures.

Each loop turn: drop cancelled jobs (a disconnected client frees its slot at once), admit queued jobs into free
slots (prefill), advance every engine with active slots by one token, decode what finished.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import threading
import time
from typing import Any

from nextstep_jax.serving.engine import Engine, Prepared


class QueueFull(Exception):
  """The bounded queue has no room; `retry_after` is a rough wait in seconds."""

  def __init__(self, retry_after: int):
    super().__init__(f"the queue is full; retry in about {retry_after} s")
    self.retry_after = retry_after


class ShuttingDown(Exception):
  """The server stopped accepting work."""


@dataclasses.dataclass(eq=False)
class Job:
  mode: str
  prepared: Prepared
  future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
  cancelled: bool = False
  submitted: float = dataclasses.field(default_factory=time.perf_counter)
  slot: int | None = None


class Scheduler:
  """Runs `engines` ({mode: Engine}) in a background thread; `submit` is thread-safe."""

  def __init__(self, engines: dict[str, Engine], max_queue: int, metrics: Any = None):
    self.engines, self.max_queue, self.metrics = engines, max_queue, metrics
    self._queue: collections.deque[Job] = collections.deque()
    self._running: dict[str, dict[int, Job]] = {m: {} for m in engines}
    self._cv = threading.Condition()
    self._accepting, self._stop = True, False
    self._thread = threading.Thread(target=self._loop, name="nextstep-scheduler", daemon=True)
    self.image_seconds = 1.0  # running estimate of one image's time in a slot (for Retry-After)
    self.error: BaseException | None = None

  # ------------------------------------------------------------------------------------------- client side

  def start(self) -> "Scheduler":
    self._thread.start()
    return self

  def submit(self, mode: str, prepared: list[Prepared]) -> list[Job]:
    """Queues a request's images together, or none of them (QueueFull / ShuttingDown)."""
    with self._cv:
      if not self._accepting or self.error is not None:
        raise ShuttingDown("the server is shutting down")
      if len(self._queue) + len(prepared) > self.max_queue:
        slots = sum(e.config.slots for e in self.engines.values())
        raise QueueFull(max(1, round(self.image_seconds * (1 + len(self._queue) / slots))))
      jobs = [Job(mode, p) for p in prepared]
      self._queue.extend(jobs)
      self._cv.notify()
    self._gauges()
    return jobs

  def cancel(self, job: Job) -> None:
    """Frees the job's slot (or queue place) at the next token boundary."""
    with self._cv:
      job.cancelled = True
      self._cv.notify()

  def stop(self, timeout: float | None = None) -> None:
    """Stops accepting, finishes queued and in-flight jobs, joins the thread."""
    with self._cv:
      self._accepting = False
      self._stop = True
      self._cv.notify()
    self._thread.join(timeout)

  @property
  def queue_depth(self) -> int:
    return len(self._queue)

  @property
  def active_slots(self) -> int:
    return sum(len(r) for r in self._running.values())

  # ------------------------------------------------------------------------------------------- loop

  def _loop(self) -> None:
    try:
      while True:
        with self._cv:
          while not self._queue and not self.active_slots and not self._stop:
            self._cv.wait(0.5)
          if self._stop and not self._queue and not self.active_slots:
            return
        self._turn()
    except BaseException as e:  # a device error: fail every waiting request with one line, refuse new ones
      self.error = e
      with self._cv:
        jobs = list(self._queue) + [j for r in self._running.values() for j in r.values()]
        self._queue.clear()
      for j in jobs:
        if not j.future.done():
          j.future.set_exception(e)

  def _turn(self) -> None:
    for mode, engine in self.engines.items():
      running = self._running[mode]
      for slot, job in list(running.items()):
        if job.cancelled:
          engine.free(slot)
          del running[slot]
          self._finish(job, None, "cancelled")
      self._admit(mode, engine, running)
      t0 = time.perf_counter()
      done = engine.step()
      if self.metrics is not None and running:
        self.metrics.tokens(len(running), time.perf_counter() - t0)
      if done:
        images = engine.decode(engine.tokens(done))
        for slot, image in zip(done, images):
          job = running.pop(slot)
          self.image_seconds = 0.8 * self.image_seconds + 0.2 * (time.perf_counter() - job.submitted)
          self._finish(job, image, "ok")
    self._gauges()

  def _admit(self, mode: str, engine: Engine, running: dict[int, Job]) -> None:
    while engine.free_slots:
      with self._cv:
        job = next((j for j in self._queue if j.mode == mode), None)
        if job is None:
          return
        self._queue.remove(job)
      if job.cancelled:
        self._finish(job, None, "cancelled")
        continue
      job.slot = engine.start(job.prepared)
      running[job.slot] = job

  def _finish(self, job: Job, image: Any, status: str) -> None:
    if self.metrics is not None:
      self.metrics.request_done(status, time.perf_counter() - job.submitted)
    if not job.future.done():
      if status == "ok":
        job.future.set_result(image)
      else:
        job.future.cancel()

  def _gauges(self) -> None:
    if self.metrics is not None:
      self.metrics.gauges(self.queue_depth, self.active_slots)

