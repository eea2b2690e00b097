"""Many workers, one dataset: the wds build on Apache Beam (DirectRunner, 2 worker processes; marker `beam`: its own venv)
and the latent encode as a 2-process JAX job (`jax.distributed` on localhost) give the same records as one worker / one process
(compared order-independently, record by record), and a redo of one encode part is byte-identical."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, run_cli, subprocess_env
from wds_fixtures import SOURCES, write_shards

from nextstep_jax import cli
from nextstep_jax.convert.vae import convert_vae
from nextstep_jax.data.builders import open_dataset
from nextstep_jax.data.distributed_encode import part_dir

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("data_beam")]


def _records(path):
  """Order-independent view: every record's fields as bytes, sorted."""
  ds = open_dataset(path)
  out = []
  for i in range(len(ds)):
    rec = ds[i]
    fields = []
    for k in sorted(rec):
      v = rec[k]
      if k == "meta":  # source_index is the record's position in the *input* dataset: compare the sample key
        meta = json.loads(v)
        v = json.dumps({m: meta[m] for m in meta if m != "source_index"}, sort_keys=True).encode()
      fields.append((k, b"".join(v) if isinstance(v, list) else np.asarray(v).tobytes()))
    out.append(tuple(fields))
  return sorted(out)


@pytest.fixture(scope="module")
def built(fixtures_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("beam")
  write_shards(root / "shards", {"interleave": SOURCES["interleave"] * 2})  # 6 samples (2 broken), 2 shards
  vae = root / "vae"
  convert_vae(os.path.join(fixtures_dir, "vae", "model.safetensors"), vae)
  assert cli.main(["data", "build", "--kind", "wds", "--src", str(root / "shards" / "interleave" / "*.tar"),
                   "--task", "interleave", "--dst", str(root / "inproc")]) == 0
  return dict(root=root, vae=str(vae))


@pytest.mark.beam
def test_beam_build_equals_the_single_process_build(built):
  assert cli.main(["data", "build", "--kind", "wds", "--src", str(built["root"] / "shards" / "interleave" / "*.tar"),
                   "--task", "interleave", "--dst", str(built["root"] / "beam2"), "--workers", "2"]) == 0
  ref = _records(built["root"] / "inproc")
  assert len(ref) == 4
  assert _records(built["root"] / "beam2") == ref
  # and the same order: keys (shard, sample) sort identically whatever the number of workers
  a, b = open_dataset(built["root"] / "inproc"), open_dataset(built["root"] / "beam2")
  assert [a[i]["meta"] for i in range(len(a))] == [b[i]["meta"] for i in range(len(b))]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_process_encode_equals_one_process_and_a_part_redo_is_byte_identical(built):
  root, src = built["root"], str(built["root"] / "inproc")
  common = ["--src", src, "--vae", built["vae"], "--batch", "2", "--resolution", "64"]
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "nextstep_jax.cli", "data", "encode", *common, "--dst",
                             str(root / "enc2"), "--distributed", "--coordinator", f"localhost:{port}",
                             "--num-processes", "2", "--process-id", str(i)], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
  run_cli(["nextstep_jax.cli", "data", "encode", *common, "--dst", str(root / "enc1")], timeout=300)
  merged = _records(root / "enc2")
  assert len(merged) == 4 and merged == _records(root / "enc1")

  part1 = part_dir(root / "enc2", 1, 2)
  shard_bytes = {p.name: p.read_bytes() for p in sorted(part1.rglob("*.array_record-*"))}
  assert shard_bytes
  # a killed process's part is redone alone, as a fresh process (same device setup as the job's)
  run_cli(["nextstep_jax.cli", "data", "encode", *common, "--dst", str(root / "enc2"), "--parts", "2", "--part", "1"],
          timeout=300)
  assert {p.name: p.read_bytes() for p in sorted(part1.rglob("*.array_record-*"))} == shard_bytes
  assert cli.main(["data", "encode", "--src", src, "--vae", built["vae"], "--dst", str(root / "enc2"),
                   "--merge", "2"]) == 0
  assert _records(root / "enc2") == merged
