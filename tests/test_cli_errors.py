"""Bad input through the real CLI, one class per test (issue 18): relative paths, damaged checkpoints and model
dirs, data that yields nothing, out-of-range numbers, unwritable outputs / full disks, library messages, stderr
noise. Each error case asserts: the exit code, exactly one error line naming problem and fix, no traceback, and
that existing model directories are byte-identical afterwards.

Subprocess runs cost seconds each here, so one subprocess (`_drive`) runs many `cli.main([...])` calls in its
working directory (a tmp dir: every path is relative) and reports each call's exit code and output.
"""
import json
import os
import resource
import signal
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, subprocess_env
from nextstep_jax.checkpoint import DAMAGED, Checkpointer

TINY_STAGE = os.path.join(ROOT, "configs", "tiny", "stage1_256px.py")
NOISE = ("host bounds", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "Metadata file does not exist",
         "Logging before InitGoogle")

DRIVER = r"""
import contextlib, io, json, sys, traceback
from nextstep_jax import cli
results = []
for kind, payload in json.load(sys.stdin):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      if kind == "py":
        exec(payload, {})
        code = 0
      else:
        code = cli.main(payload)
    except BaseException:
      traceback.print_exc()
      code = "raised"
  results.append(dict(code=code, out=out.getvalue(), err=err.getvalue()))
print("RESULTS " + json.dumps(results))
"""

FLIP = """
import pathlib
files = [p for p in pathlib.Path({root!r}).rglob("*") if p.is_file() and "/d/" in str(p)]
f = max(files, key=lambda p: p.stat().st_size)
b = bytearray(f.read_bytes()); b[len(b) // 2] ^= 0xFF; f.write_bytes(bytes(b))
"""


def _env(drop_platform: bool = False) -> dict:
  env = subprocess_env()
  env["PYTHONPATH"] = ROOT
  if drop_platform:  # as a user's shell: the CLI itself must keep a CPU-only machine quiet
    env.pop("JAX_PLATFORMS", None)
  return env


def _drive(cwd, steps, timeout=600):
  proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(steps), capture_output=True, text=True,
                        cwd=cwd, env=_env(), timeout=timeout)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(lines[-1][len("RESULTS "):])


DIGEST = """
import hashlib, os

def tree_digest(root):
  h = hashlib.sha256()
  for dirpath, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(files):
      p = os.path.join(dirpath, name)
      h.update(os.path.relpath(p, root).encode())
      with open(p, "rb") as f:
        h.update(f.read())
  return h.hexdigest()
"""
_ns: dict = {}
exec(DIGEST, _ns)
_tree_digest = _ns["tree_digest"]
RECORD = DIGEST + "\nfor d in {dirs!r}:\n  open(d + '.sha', 'w').write(tree_digest(d))\n"


def _one_error(result, code, *needles):
  """Exit code, exactly one `error:` line containing every needle, no traceback."""
  err = result["err"]
  assert result["code"] == code, result
  assert "Traceback" not in err, err
  errors = [l for l in err.splitlines() if "error:" in l]
  assert len(errors) == 1, err
  for n in needles:
    assert n in errors[0], errors[0]
  return errors[0]


def _data_config(path, tokenizer):
  return f"""
import ml_collections
from nextstep_jax.data.config import default_data_config

def get_config(arg=None):
  d = default_data_config()
  d.sources = [dict(name="main", path={path!r}, weight=1.0, kind="")]
  d.update(tokenizer={tokenizer!r}, encode_on_the_fly=True, pack=False, resolution=32, buckets="fixed", seq_len=256,
           global_batch_size=2, read_threads=1)
  return ml_collections.ConfigDict(dict(data=d))
"""


@pytest.fixture(scope="module")
def session(tmp_path_factory, fixtures_dir):
  """One driver run over every in-process case; returns (cwd, {case name: result}, digests before/after)."""
  cwd = tmp_path_factory.mktemp("cli_errors")
  (cwd / "afile").write_text("not a directory")
  (cwd / "imgs").mkdir()
  for i in range(3):  # no captions, 8×8 px: smaller than any 32-px bucket
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(cwd / "imgs" / f"im{i}.png")
  (cwd / "inspect_cfg.py").write_text(_data_config("raw", "model/tokenizer"))
  sample = ["sample", "--checkpoint", "model", "--prompt", "a cat", "--size", "16x16", "--steps", "2"]
  cases = [
      ("convert", ["cli", ["convert", "nextstep", "--src", fixtures_dir, "--dst", "model"]]),
      ("copy", ["py", "import shutil; shutil.copytree('model', 'broken')"]),
      ("flip", ["py", FLIP.format(root="broken/params")]),
      ("record", ["py", RECORD.format(dirs=["model", "broken"])]),
      ("convert_again", ["cli", ["convert", "nextstep", "--src", fixtures_dir, "--dst", "model"]]),
      ("nan_cfg", ["cli", sample + ["--cfg", "nan"]]),
      ("zero_steps", ["cli", sample + ["--steps", "0"]]),
      ("aot_steps", ["cli", ["aot", "--config", TINY_STAGE, "--topology", "v5p-8", "--program", "sample",
                             "--sample-steps", "-1"]]),
      ("ratio", ["cli", ["data", "encode", "--src", "raw", "--dst", "lat", "--vae", "model",
                         "--min-size-ratio", "2"]]),
      ("out_parent_file", ["cli", sample + ["--out", "afile/o.png"]]),
      ("dst_parent_file", ["cli", ["convert", "nextstep", "--src", fixtures_dir, "--dst", "afile/m"]]),
      ("damaged", ["cli", ["sample", "--checkpoint", "broken", "--prompt", "a cat", "--size", "16x16",
                           "--steps", "2", "--out", "b.png"]]),
      ("build", ["cli", ["data", "build", "--kind", "image_text", "--src", "imgs", "--dst", "raw",
                         "--resolution", "32"]]),
      ("inspect", ["cli", ["data", "inspect", "--config", "inspect_cfg.py"]]),
      ("encode", ["cli", ["data", "encode", "--src", "raw", "--dst", "lat", "--vae", "model", "--batch", "2",
                          "--resolution", "32", "--buckets", "fixed"]]),
  ]
  names = [n for n, _ in cases]
  results = _drive(cwd, [c for _, c in cases])
  return cwd, dict(zip(names, results))


def test_relative_paths_convert_and_sample_quietly(session):
  """Class 1 + 7: README-shaped commands with relative paths; a real `python -m` run without JAX_PLATFORMS
  prints no libtpu / absl noise."""
  cwd, r = session
  assert r["convert"]["code"] == 0, r["convert"]
  assert (cwd / "model" / "params" / "nextstep_files.json").is_file()
  proc = subprocess.run([sys.executable, "-m", "nextstep_jax.cli", "sample", "--checkpoint", "model", "--prompt",
                         "a cat", "--size", "16x16", "--steps", "2", "--out", "out/cat.png"],
                        capture_output=True, text=True, cwd=cwd, env=_env(drop_platform=True), timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert Image.open(cwd / "out" / "cat.png").size == (16, 16)
  assert not [n for n in NOISE if n in proc.stderr], proc.stderr
  assert "Traceback" not in proc.stderr and "error:" not in proc.stderr


def test_damaged_model_dir_is_one_line_naming_the_file(session):
  """Class 2 (params-only model dir): a flipped byte in a tensor file is named; the directory is untouched."""
  cwd, r = session
  line = _one_error(r["damaged"], 2, "damaged parameter set", "does not match the checksum", "re-convert")
  assert str(cwd / "broken" / "params") in line
  assert _tree_digest(cwd / "broken") == (cwd / "broken.sha").read_text()  # reading it changed nothing


def test_data_that_yields_nothing_fails_fast(session):
  """Class 3: build warns (captions, too small), a pipeline over all-skipped records stops in one line, encode
  with zero examples says so and leaves no dataset."""
  cwd, r = session
  build = r["build"]
  assert build["code"] == 0, build
  assert "3 of 3 images have no caption" in build["err"] and "smaller than their 32-px bucket" in build["err"]
  _one_error(r["inspect"], 2, "all 3 records skipped: empty_caption ×3")
  _one_error(r["encode"], 2, "all 3 records", "empty_caption ×3", "nothing was written")
  assert not (cwd / "lat").exists() or not any((cwd / "lat").rglob("dataset_info.json"))


def test_numbers_are_checked_at_the_edge(session):
  """Class 4: NaN / out-of-range numeric options of sample, aot and data, rejected before any work."""
  _, r = session
  _one_error(r["nan_cfg"], 2, "--cfg", "nan is not a finite number")
  _one_error(r["zero_steps"], 2, "--steps", "must be ≥ 1")
  _one_error(r["aot_steps"], 2, "--sample-steps", "must be ≥ 1")
  _one_error(r["ratio"], 2, "--min-size-ratio", "must be ≤ 1")


def test_unwritable_outputs_fail_before_work(session):
  """Class 5: --out / --dst under a file fail before the model is loaded or converted."""
  cwd, r = session
  _one_error(r["out_parent_file"], 2, "--out", "is a file, not a directory")
  assert "loading" not in r["out_parent_file"]["err"]
  _one_error(r["dst_parent_file"], 2, "--dst", "is a file, not a directory")
  assert (cwd / "afile").read_text() == "not a directory"


def test_existing_destination_names_overwrite(session):
  """Class 6: converting onto an existing model dir refuses in one line that names --overwrite."""
  cwd, r = session
  _one_error(r["convert_again"], 2, "already exists", "--overwrite")
  assert not (cwd / ".model.partial").exists()
  assert _tree_digest(cwd / "model") == (cwd / "model.sha").read_text()  # after every case of the session


def test_full_disk_during_conversion_leaves_nothing_and_rerun_works(session, fixtures_dir):
  """Class 5 + 6: a write failing mid-conversion (file size limit ≈ a full disk) is one line naming the path;
  the destination never appears half-written and the rerun succeeds."""
  cwd, _ = session

  def limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

  cmd = [sys.executable, "-m", "nextstep_jax.cli", "convert", "nextstep", "--src", fixtures_dir, "--dst", "full"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=600, preexec_fn=limit)
  _one_error(dict(code=proc.returncode, err=proc.stderr), 2, f"writing {cwd / 'full'} failed: File too large")
  assert not (cwd / "full").exists() and not (cwd / ".full.partial").exists()
  from nextstep_jax.cli import main
  old = os.getcwd()
  try:
    os.chdir(cwd)
    assert main(["convert", "nextstep", "--src", fixtures_dir, "--dst", "full"]) == 0
  finally:
    os.chdir(old)
  assert (cwd / "full" / "params" / "nextstep_files.json").is_file()


# ------------------------------------------------------------------- Checkpointer: verification and messages


@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict


def _state(width: int, value: float) -> _State:
  return _State(step=jnp.int32(0), params={"w": jnp.full((4, width), value, jnp.float32)})


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_torn_newest_checkpoint_is_set_aside_and_the_previous_one_used(tmp_path, capsys):
  """Class 2 (training workdir): the newest step with a flipped byte is moved (not deleted) to
  checkpoints_damaged/ with one warning naming it; resume uses the newest intact step."""
  ckpt = Checkpointer(tmp_path, save_every=1, keep=3, model_config={"width": 8})
  for step in (1, 2):
    ckpt.save(step, _state(8, float(step)), None, force=True)
  ckpt.close()
  step2 = tmp_path / "checkpoints" / "2"
  exec(FLIP.format(root=str(step2)), {})
  torn = _tree_digest(step2)
  intact = _tree_digest(tmp_path / "checkpoints" / "1")
  ckpt = Checkpointer(tmp_path, save_every=1, keep=3, model_config={"width": 8})
  assert ckpt.latest_step() == 1
  warning = capsys.readouterr().err.strip().splitlines()
  assert len(warning) == 1 and "checkpoint step 2 is damaged" in warning[0] and "resuming from step 1" in warning[0]
  assert _tree_digest(tmp_path / DAMAGED / "2") == torn  # kept as it was, for inspection
  assert _tree_digest(tmp_path / "checkpoints" / "1") == intact
  restored = ckpt.restore(1, _abstract(_state(8, 0.0)), None)
  assert float(restored.params["w"][0, 0]) == 1.0
  ckpt.save(2, _state(8, 2.0), None, force=True)  # the step number is free again
  ckpt.close()


def test_resume_with_another_model_names_the_field(tmp_path):
  """Class 6: a shape mismatch names the config field and init_from, not Orbax's `strict=False` advice."""
  ckpt = Checkpointer(tmp_path, save_every=1, model_config={"width": 8, "depth": 2})
  ckpt.save(1, _state(8, 1.0), None, force=True)
  ckpt.close()
  before = _tree_digest(tmp_path / "checkpoints")
  ckpt = Checkpointer(tmp_path, save_every=1, model_config={"width": 16, "depth": 2})
  with pytest.raises(ValueError) as e:
    ckpt.restore(ckpt.latest_step(), _abstract(_state(16, 0.0)), None)
  ckpt.close()
  msg = str(e.value)
  assert "model.width=16 (checkpoint: 8)" in msg and "init_from" in msg and "strict" not in msg
  assert "\n" not in msg
  assert _tree_digest(tmp_path / "checkpoints") == before


SAVE_WHEN_FULL = """
import resource, signal, jax
from nextstep_jax.checkpoint import Checkpointer
from nextstep_jax.cli import describe_error
ckpt = Checkpointer("w", save_every=1)
ckpt.save(1, {"params": {"w": jax.numpy.ones((4, 4))}}, None, force=True)
ckpt.wait()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))  # the disk is "full" from here on
try:
  ckpt.save(2, {"params": {"w": jax.random.normal(jax.random.key(0), (512, 512))}}, None, force=True)
  ckpt.close()
except Exception as e:
  print("LINE", describe_error(e))
"""


def test_full_disk_during_checkpointing_names_path_and_kept_step(tmp_path):
  """Class 5: an asynchronous checkpoint write failing on a full disk is one line naming the path and the step
  that was kept (the previous checkpoint), which stays intact."""
  proc = subprocess.run([sys.executable, "-c", SAVE_WHEN_FULL], capture_output=True, text=True, cwd=tmp_path,
                        env=_env(), timeout=300)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("LINE ")]
  assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
  line, code = eval(lines[0][5:])  # noqa: S307 — our own repr of a (str, int) tuple
  assert code == 2 and "\n" not in line
  assert f"writing checkpoint step 2 to {tmp_path / 'w' / 'checkpoints'} failed: File too large" in line
  assert "kept checkpoint step 1" in line
  ckpt = Checkpointer(tmp_path / "w", save_every=1)
  assert ckpt.latest_step() == 1
  ckpt.close()


def test_library_entry_points_take_relative_paths(session, monkeypatch):
  """Class 1 (library): params_io, Checkpointer and Sampler.from_checkpoint resolve relative paths themselves."""
  from nextstep_jax import params_io
  from nextstep_jax.sampling.pipeline import Sampler
  cwd, _ = session
  monkeypatch.chdir(cwd)
  params_io.save_params_streaming("rel/params", [(("w",), np.arange(6, dtype=np.float32))])
  assert params_io.load_params("rel/params")["w"].tolist() == list(range(6))
  ckpt = Checkpointer("rel/work", save_every=1)
  ckpt.save(1, _state(8, 3.0), None, force=True)
  ckpt.close()
  ckpt = Checkpointer("rel/work", save_every=1)
  assert float(ckpt.restore(ckpt.latest_step(), _abstract(_state(8, 0.0)), None).params["w"][0, 0]) == 3.0
  ckpt.close()
  assert Sampler.from_checkpoint("model").vae_cfg is not None


def _packer(elements, records_per_epoch):
  import grain

  from nextstep_jax.data.packing import PackBatchIterDataset, PackSpec
  spec = PackSpec(batch_size=1, seq_len=8, image_slots=4, token_dim=4, pad_id=0, placeholder_id=9,
                  records_per_epoch=records_per_epoch)
  return iter(PackBatchIterDataset(grain.MapDataset.source(elements).repeat().to_iter_dataset(), spec))


def test_packer_fails_fast_and_warns_on_a_high_skip_rate(caplog):
  """Class 3 (the mechanism): a pass of skipped records raises at once instead of looping; a mostly-skipped pass
  warns once."""
  from nextstep_jax.data.packing import NoUsableRecordsError
  skip = lambda i, r: {"skip": r, "source": "main", "index": i, "detail": ""}  # noqa: E731
  it = _packer([skip(0, "empty_caption"), skip(1, "empty_caption"), skip(2, "too_small")], 3)
  with pytest.raises(NoUsableRecordsError, match=r"all 3 records skipped: empty_caption ×2, too_small ×1"):
    next(it)
  sample = {"ids": np.array([1, 2, 3], np.int32), "tokens": np.zeros((0, 4), np.float32),
            "token_loss": np.zeros((0,), np.float32), "token_grid": np.zeros((0, 4), np.int32)}
  it = _packer([skip(0, "too_small"), skip(1, "too_small"), skip(2, "too_small"), sample], 4)
  with caplog.at_level("WARNING", logger="nextstep_jax.data"):
    for _ in range(3):
      next(it)
  assert [r.getMessage() for r in caplog.records if "were skipped" in r.getMessage()] == [
      "3 of the first 4 records (75 %) were skipped; check the data and config.data"]
