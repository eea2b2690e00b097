"""`launch/tpu_vm.sh encode`: the latent-caching job runs `nextstep-jax data encode --distributed ARGS` on every
worker (detached, its own log and exit-code file); without ARGS it refuses in one line."""
import shlex

from test_launch import LOC, NAME, QR, commands, remote, sh  # noqa: F401 (sh is a fixture)

ZONE_ARGS = ["--name", NAME, *LOC]


def test_encode_runs_data_encode_distributed_on_every_worker(sh):
  out = commands(sh("tpu_vm.sh", "encode", "--dry-run", *ZONE_ARGS, "--", "--src", "gs://b/raw", "--dst",
                    "gs://b/lat x", "--vae", "gs://b/m"))
  assert len(out) == 1 and out[0][:len(QR) + 6] == QR + ["ssh", NAME, *LOC, "--node=all", "--worker=all"]
  words = shlex.split(remote(out[0]))
  inner = words[words.index("-c") + 1]
  assert shlex.split(inner.split(";")[0]) == ["venv/bin/nextstep-jax", "data", "encode", "--distributed", "--src",
                                             "gs://b/raw", "--dst", "gs://b/lat x", "--vae", "gs://b/m"]
  assert "logs/encode.log" in remote(out[0]) and "encode.rc" in inner


def test_encode_without_arguments_is_one_line(sh):
  r = sh("tpu_vm.sh", "encode", "--dry-run", *ZONE_ARGS)
  assert r.returncode != 0 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
  assert "needs the data encode arguments after --" in r.stderr
