"""The test harness's crash handling: the crash-safe `--dist loadgroup` scheduler (tests/xdist_crash_safe.py) turns a
worker that dies mid-run into one failed test and a finished session (not a hang, every other test still run)."""
import os
import subprocess
import sys

CRASHING_SUITE = '''
import os
import pytest

def test_before_1(): pass
def test_before_2(): pass
def test_crash(): os.abort()  # a native abort, as XLA:CPU's
def test_after_1(): pass
def test_after_2(): pass

@pytest.mark.xdist_group("g")
def test_group_1(): pass

@pytest.mark.xdist_group("g")
def test_group_2(): pass
'''


def test_crashed_worker_is_reported_and_the_run_finishes(tmp_path):
  (tmp_path / "test_suite.py").write_text(CRASHING_SUITE)
  proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q",
                         "-p", "xdist_crash_safe", "-p", "no:cacheprovider", "-p", "no:faulthandler", "test_suite.py"],
                        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=os.path.dirname(__file__)),
                        capture_output=True, text=True, timeout=120)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out[-2000:]
  assert "1 failed, 6 passed" in out, out[-2000:]
  assert "crashed while running 'test_suite.py::test_crash'" in out, out[-2000:]
