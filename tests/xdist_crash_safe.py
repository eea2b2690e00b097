"""pytest-xdist plugin: `--dist loadgroup` that survives a crashed worker.

pytest-xdist 3.8.0 (the newest release on the registry) deadlocks `--dist loadgroup` when a worker dies (a native
abort, the OOM killer): `remove_node` re-queues the dead worker's *completed* work units, which are then sent as
empty batches that never complete, and a replacement worker given a single test waits forever for a second one
(upstream issues pytest-dev/pytest-xdist#1323, #1327, #1378; fixes merged after 3.8.0). A CI run then ends in its
wall-clock timeout instead of a report. This scheduler re-queues only pending tests, does not re-run the test the
worker died on (xdist already reported it as failed), and keeps every live worker topped up or shut down.

Loaded by tests/conftest.py; tests/test_xdist_crash_safe.py runs a crashing worker through it.
"""
from __future__ import annotations

from xdist.scheduler import LoadGroupScheduling


class CrashSafeLoadGroupScheduling(LoadGroupScheduling):
  """LoadGroupScheduling whose worker-crash path neither hangs nor re-runs the crashing test."""

  def remove_node(self, node):
    """Drops `node`; re-queues its unfinished tests. Returns the node id it crashed on, or None (clean exit)."""
    workload = self.assigned_work.pop(node)
    pending = [(scope, nodeid) for scope, unit in workload.items() for nodeid, done in unit.items() if not done]
    if not pending:
      return None
    scope, crashitem = pending[0]
    workload[scope][crashitem] = True  # reported as failed by xdist; running it again would crash the next worker
    self.workqueue.update({s: unit for s, unit in workload.items() if not all(unit.values())})
    for other in self.assigned_work:
      self._reschedule(other)
    return crashitem

  def _reschedule(self, node):
    """Tops `node` up to 3 pending tests (xdist's heuristic; a worker starts a test only once it knows the next one
    or has been told to stop — a replacement worker handed one test waited forever), then shuts it down once nothing
    is left to hand out."""
    if node.shutting_down:
      return
    while self.workqueue and self._pending_of(self.assigned_work[node]) <= 2:
      self._assign_work_unit(node)
    if not self.workqueue:
      node.shutdown()


def pytest_xdist_make_scheduler(config, log):
  """Use the crash-safe scheduler for `--dist loadgroup`; any other mode keeps xdist's own (returns None)."""
  if config.getvalue("dist") == "loadgroup":
    return CrashSafeLoadGroupScheduling(config, log)
  return None
