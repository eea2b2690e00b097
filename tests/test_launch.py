"""launch/*.sh: the exact commands --dry-run prints, the supervisor's preemption loop, argument errors.

Every script runs under bash with stub `gcloud`/`xpk`/`kubectl` first on PATH: a stub records its
argv, so a dry run that executed anything fails, and a real run can be compared with its dry run.
"""
import json
import os
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
NAME = "nextstep-stage1-256px"
ZONE = "us-east5-a"
GIT_SRC = "git+https://github.com/org/nextstep_jax@v1"
LOC = [f"--zone={ZONE}", "--project=proj"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
VM = ["gcloud", "compute", "tpus", "tpu-vm"]
TRAIN = ["train", "--config", "configs/nextstep1_14b/stage1_256px.py", "--workdir", "gs://b/run", "--multihost"]
POD = ["--stage", "stage1_256px", "--workdir", "gs://b/run", "--zone", ZONE, "--project", "proj",
       "--accelerator-type", "v5p-256", "--package-source", GIT_SRC]
GKE = ["--stage", "stage1_256px", "--workdir", "gs://b/run", "--tpu-type", "v5p-256",
       "--docker-image", "img:1", "--cluster", "c1", "--zone", ZONE, "--project", "proj"]

STUB = """#!{python}
import json, os, sys
argv = [os.path.basename(sys.argv[0])] + sys.argv[1:]
with open(os.environ["STUB_CALLS"], "a") as f:
  f.write(json.dumps(argv) + "\\n")
if "describe" in argv and any(a.startswith("--format=") for a in argv):
  print("ACTIVE" if "queued-resources" in argv else "READY")
elif "ssh" in argv and "--worker=0" in argv:
  print("EXITED 0")
"""


def _executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


def _sequence_stub(tmp_path, name, answers):
  """An executable that prints answers[i] on its i-th call (the last one from then on)."""
  counter = tmp_path / f"{name}.count"
  return _executable(tmp_path / name, "#!/usr/bin/env bash\n"
                     f'n=$(cat {counter} 2>/dev/null || echo 0); echo $((n + 1)) > {counter}\n'
                     f'answers=({" ".join(shlex.quote(a) for a in answers)})\n'
                     'i=$(( n < ${#answers[@]} ? n : ${#answers[@]} - 1 )); echo "${answers[$i]}"\n')


@pytest.fixture
def sh(tmp_path):
  """sh(script, *args, env=None) -> CompletedProcess, with recording stubs for the cloud CLIs."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in ("gcloud", "xpk", "kubectl"):
    _executable(bin_dir / tool, STUB.format(python=sys.executable))
  calls = tmp_path / "calls.jsonl"

  def run(script, *args, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NEXTSTEP_LAUNCH_")}
    full_env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_CALLS=str(calls), **(env or {}))
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=full_env, timeout=60)

  run.calls = lambda: [json.loads(l) for l in calls.read_text().splitlines()] if calls.exists() else []
  return run


def commands(result):
  """The printed command lines as argv lists (dry-run output is shell-quoted, one per line)."""
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def shape(out):
  """Commands cut to what the tests pin down exactly: ssh without --command, rsync without paths."""
  def cut(c):
    if "ssh" in c:
      return c[:-1]
    return c[:3] if c[:3] == ["gcloud", "storage", "rsync"] else c
  return [cut(c) for c in out]


def remote(argv):
  """The --command=... of a gcloud ssh argv."""
  [cmd] = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return cmd


def train_argv(argv):
  """The `nextstep-jax` argv inside the remote train command (bash -c "...; rc=$?; ...")."""
  words = shlex.split(remote(argv))
  inner = words[words.index("-c") + 1]  # shlex keeps the \$ of "...\$?..." (bash would not)
  return shlex.split(inner.split("; rc=\\$?")[0])


def ssh(kind, worker="all", node="all"):
  if kind == "qr":
    return QR + ["ssh", NAME, *LOC, f"--node={node}", f"--worker={worker}"]
  return VM + ["ssh", NAME, *LOC, f"--worker={worker}"]


# ---- launch/tpu_vm.sh ------------------------------------------------------------------------

def test_up_single_slice_queued_resource(sh):
  out = commands(sh("tpu_vm.sh", "up", "--dry-run", *POD, "--spot"))
  assert shape(out) == [
      QR + ["create", NAME, *LOC, "--accelerator-type=v5p-256", "--runtime-version=v2-alpha-tpuv5",
            f"--node-id={NAME}", "--spot"],
      QR + ["describe", NAME, *LOC, "--format=value(state.state)"],
      ["gcloud", "storage", "rsync"],
      ssh("qr"),
      ssh("qr"),
  ]
  assert out[2] == ["gcloud", "storage", "rsync", "--recursive", str(REPO / "configs"), "gs://b/run/launch/configs"]
  install, train = remote(out[3]), out[4]
  assert f'uv pip install --python venv/bin/python "nextstep_jax[tpu] @ {GIT_SRC}"' in install
  assert install.endswith("gcloud storage rsync --recursive gs://b/run/launch/configs configs")
  assert train_argv(train) == ["venv/bin/nextstep-jax"] + TRAIN
  assert ">> logs/train.log 2>&1" in remote(train)
  assert sh.calls() == []


def test_up_multislice_sets_node_count_and_dcn(sh):
  out = commands(sh("tpu_vm.sh", "up", "--dry-run", *POD, "--num-slices", "4", "--reserved"))
  assert out[0] == QR + ["create", NAME, *LOC, "--accelerator-type=v5p-256", "--runtime-version=v2-alpha-tpuv5",
                         "--node-count=4", f"--node-prefix={NAME}", "--reserved"]
  assert shape(out)[-1] == ssh("qr")
  assert train_argv(out[-1]) == ["venv/bin/nextstep-jax"] + TRAIN + ["--config.mesh.dcn_data=4"]


def test_single_slice_has_no_dcn_override_and_overrides_pass_through(sh):
  out = commands(sh("tpu_vm.sh", "train", "--dry-run", *_without(POD, "--package-source", "--accelerator-type"),
                    "--config.train.init_from=gs://b/s1/export",
                    "--config.mesh.fsdp=64", "--", "--debug"))
  assert len(out) == 1
  assert train_argv(out[0]) == ["venv/bin/nextstep-jax"] + TRAIN + [
      "--config.train.init_from=gs://b/s1/export", "--config.mesh.fsdp=64", "--debug"]


def test_vm_mode_create_describe_ssh(sh):
  args = [a if a != "v5p-256" else "v4-32" for a in POD]
  out = commands(sh("tpu_vm.sh", "up", "--dry-run", *args, "--mode=vm", "--preemptible"))
  assert out[0] == VM + ["create", NAME, *LOC, "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
                         "--preemptible"]
  assert out[1] == VM + ["describe", NAME, *LOC, "--format=value(state)"]
  assert shape(out[3:]) == [ssh("vm"), ssh("vm")]


def test_gcs_wheel_package_source_and_create_args(sh):
  wheel = "gs://b/dist/nextstep_jax-0.1.0-py3-none-any.whl"
  args = [a if a != GIT_SRC else wheel for a in POD]
  out = commands(sh("tpu_vm.sh", "up", "--dry-run", *args, "--create-arg=--network=net", "--python", "3.11"))
  assert out[0][-1] == "--network=net"
  install = remote(out[3])
  assert f"gcloud storage cp {wheel} /tmp/ && " in install
  assert '"nextstep_jax[tpu] @ file:///tmp/nextstep_jax-0.1.0-py3-none-any.whl"' in install
  assert "venv --allow-existing --python 3.11 venv" in install


@pytest.mark.parametrize("mode,expected", [
    ("qr", [QR + ["delete", NAME, *LOC, "--force", "--quiet"]]),
    ("vm", [VM + ["delete", NAME, *LOC, "--quiet"]]),
])
def test_delete(sh, mode, expected):
  assert commands(sh("tpu_vm.sh", "delete", "--dry-run", "--name", NAME, "--zone", ZONE,
                     "--project", "proj", "--mode", mode)) == expected


def test_status_and_logs(sh):
  base = ["--dry-run", "--stage", "stage1_256px", "--zone", ZONE, "--project", "proj"]
  status = commands(sh("tpu_vm.sh", "status", *base))
  assert status[0] == QR + ["describe", NAME, *LOC]
  assert status[1][:-1] == ssh("qr", worker="0", node="0") and "EXITED" in remote(status[1])
  logs = commands(sh("tpu_vm.sh", "logs", *base, "--worker", "0", "--lines", "20", "--follow"))
  assert logs[0][:-1] == ssh("qr", worker="0", node="0")
  assert remote(logs[0]).startswith("tail -n 20 -F ~/nextstep/logs/train.log | sed -u")


def test_real_run_executes_what_dry_run_prints(sh):
  dry = commands(sh("tpu_vm.sh", "up", "--dry-run", *POD, "--num-slices", "2"))
  assert sh.calls() == []
  real = sh("tpu_vm.sh", "up", *POD, "--num-slices", "2")
  assert real.returncode == 0, real.stderr
  assert sh.calls() == dry
  assert "+ gcloud compute tpus queued-resources create" in real.stderr


def test_remote_commands_run_on_a_worker(tmp_path, sh):
  """Run the train and job-probe commands in a sandbox HOME: the quoting survives a real shell."""
  out = commands(sh("tpu_vm.sh", "train", "--dry-run", *POD, "--num-slices", "2", "--config.x=a b"))
  probe = remote(commands(sh("tpu_vm.sh", "status", "--dry-run", *POD))[1])
  home = tmp_path / "home"
  (home / "nextstep" / "venv" / "bin").mkdir(parents=True)
  _executable(home / "nextstep" / "venv" / "bin" / "nextstep-jax",
              '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$HOME/argv"\n'
              'for _ in $(seq 600); do [ -f "$HOME/release" ] && exit 3; sleep 0.05; done; exit 9\n')
  env = dict(os.environ, HOME=str(home), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
             STUB_CALLS=str(tmp_path / "worker_calls.jsonl"))

  def on_worker(cmd):
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=30).stdout.strip()

  assert on_worker(probe) == "NONE"
  on_worker(remote(out[0]))
  assert on_worker(probe) == "RUNNING"
  assert on_worker(remote(out[0])).startswith("training already runs")
  (home / "release").touch()
  for _ in range(300):
    if on_worker(probe) != "RUNNING":
      break
    time.sleep(0.1)
  assert on_worker(probe) == "EXITED 3"
  assert (home / "argv").read_text().splitlines() == TRAIN + ["--config.mesh.dcn_data=2", "--config.x=a b"]
  [upload] = [json.loads(l) for l in (tmp_path / "worker_calls.jsonl").read_text().splitlines()]
  assert upload[:4] == ["gcloud", "storage", "cp", "logs/train.log"]
  assert upload[4].startswith("gs://b/run/launch/logs/") and upload[4].endswith(".log")
  assert "already" not in (home / "nextstep" / "logs" / "train.log").read_text()
  install = remote(commands(sh("tpu_vm.sh", "install", "--dry-run", *POD))[1])
  assert subprocess.run(["bash", "-n", "-c", install]).returncode == 0


# ---- the supervisor --------------------------------------------------------------------------

def supervise_expected(kind, recreate):
  """What supervise prints for the state sequence <bad state>, <ready>... with the dry-run job answer."""
  base = QR if kind == "qr" else VM
  fmt = "--format=value(state.state)" if kind == "qr" else "--format=value(state)"
  describe = base + ["describe", NAME, *LOC, fmt]
  probe = ssh(kind, worker="0", node="0")
  sleep = ["sleep", "60"]
  return [describe, *recreate, sleep,
          describe, ["gcloud", "storage", "rsync"], ssh(kind), ssh(kind), sleep,
          describe, probe, sleep,
          describe, probe]


@pytest.mark.parametrize("kind,bad,good", [("vm", "PREEMPTED", "READY"), ("qr", "SUSPENDED", "ACTIVE")])
def test_supervisor_recreates_and_relaunches_after_preemption(sh, tmp_path, kind, bad, good):
  stub = _sequence_stub(tmp_path, "state", [bad, good])
  result = sh("tpu_vm.sh", "supervise", "--dry-run", *POD, "--mode", kind,
              env={"NEXTSTEP_LAUNCH_STATE_CMD": str(stub)})
  out = commands(result)
  base = QR if kind == "qr" else VM
  create = commands(sh("tpu_vm.sh", "create", "--dry-run", *POD, "--mode", kind))
  delete = [base + ["delete", NAME, *LOC] + (["--force", "--quiet"] if kind == "qr" else ["--quiet"])]
  assert shape(out) == supervise_expected(kind, delete + create)
  assert train_argv(out[7]) == ["venv/bin/nextstep-jax"] + TRAIN
  assert f"{NAME} is {bad}: recreating it (restart 1/100)" in result.stderr
  assert "training finished" in result.stderr
  assert (tmp_path / "state.count").read_text().strip() == "4"
  assert sh.calls() == []


def test_supervisor_preempted_mid_run_after_the_trainer_exited_0(sh, tmp_path):
  """SIGTERM makes the trainer save and exit 0; the TPU state then turns PREEMPTED: not finished."""
  stub = _sequence_stub(tmp_path, "state", ["ACTIVE", "ACTIVE", "SUSPENDED", "ACTIVE"])
  out = commands(sh("tpu_vm.sh", "supervise", "--dry-run", *POD, "--poll", "5",
                    env={"NEXTSTEP_LAUNCH_STATE_CMD": str(stub)}))
  describe = QR + ["describe", NAME, *LOC, "--format=value(state.state)"]
  launch = [["gcloud", "storage", "rsync"], ssh("qr"), ssh("qr")]
  probe, sleep = ssh("qr", worker="0", node="0"), ["sleep", "5"]
  recreate = [QR + ["delete", NAME, *LOC, "--force", "--quiet"],
              commands(sh("tpu_vm.sh", "create", "--dry-run", *POD))[0]]
  assert shape(out) == [describe, *launch, sleep,
                        describe, probe, sleep,  # EXITED 0, but not yet confirmed
                        describe, *recreate, sleep,
                        describe, *launch, sleep,
                        describe, probe, sleep,
                        describe, probe]


def test_supervisor_without_stubs_runs_like_its_dry_run(sh):
  dry = commands(sh("tpu_vm.sh", "supervise", "--dry-run", *POD, "--poll", "0"))
  real = sh("tpu_vm.sh", "supervise", *POD, "--poll", "0")
  assert real.returncode == 0, real.stderr
  assert sh.calls() == [c for c in dry if c[0] != "sleep"]
  assert sum("ssh" in c for c in dry) == 4  # install, train, then the job probe twice


def test_supervisor_gives_up_after_max_restarts(sh, tmp_path):
  stub = _sequence_stub(tmp_path, "state", ["PREEMPTED"])
  result = sh("tpu_vm.sh", "supervise", "--dry-run", *POD, "--mode", "vm", "--max-restarts", "2",
              env={"NEXTSTEP_LAUNCH_STATE_CMD": str(stub)})
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"tpu_vm.sh: error: {NAME} is PREEMPTED and --max-restarts 2 is used up")
  printed = [shlex.split(line) for line in result.stdout.splitlines()]
  assert [c[4] for c in printed if c[:4] == VM].count("create") == 2


def test_supervisor_relaunches_a_crashed_trainer_without_recreating(sh, tmp_path):
  state = _sequence_stub(tmp_path, "state", ["ACTIVE"])
  job = _sequence_stub(tmp_path, "job", ["EXITED 1", "RUNNING", "EXITED 0"])
  env = {"NEXTSTEP_LAUNCH_STATE_CMD": str(state), "NEXTSTEP_LAUNCH_JOB_CMD": str(job)}
  out = commands(sh("tpu_vm.sh", "supervise", "--dry-run", *POD, env=env))
  ssh_commands = [remote(c) for c in out if "ssh" in c]
  assert sum("uv pip install" in c for c in ssh_commands) == 1
  assert sum("nohup bash -c" in c for c in ssh_commands) == 2
  assert not any(c[4] in ("create", "delete") for c in out if c[:4] == QR)
  crashed = sh("tpu_vm.sh", "supervise", "--dry-run", *POD, "--max-failures", "0",
               env=dict(env, NEXTSTEP_LAUNCH_JOB_CMD=str(_sequence_stub(tmp_path, "job2", ["EXITED 1"]))))
  assert crashed.returncode == 2
  assert "error: training failed 1 times (last: EXITED 1)" in crashed.stderr


# ---- launch/gke.sh ---------------------------------------------------------------------------

def test_xpk_workload_create(sh):
  out = commands(sh("gke.sh", "submit", "--dry-run", *GKE, "--num-slices", "2", "--priority", "high"))
  assert len(out) == 1
  argv = out[0]
  assert argv[:-1] == ["xpk", "workload", "create", "--cluster=c1", f"--workload={NAME}", "--tpu-type=v5p-256",
                       "--num-slices=2", "--docker-image=img:1", "--max-restarts=50", "--priority=high",
                       "--project=proj", f"--zone={ZONE}"]
  assert argv[-1].startswith("--command=")
  assert shlex.split(argv[-1][len("--command="):]) == ["nextstep-jax"] + TRAIN + ["--config.mesh.dcn_data=2"]
  assert sh.calls() == []


def manifest_from(out_text):
  lines = out_text.splitlines()
  start = lines.index("kubectl apply -f - <<'EOF'")
  end = lines.index("EOF", start)
  return lines[:start], yaml.safe_load("\n".join(lines[start + 1:end]))


def test_jobset_submit_renders_the_manifest(sh):
  result = sh("gke.sh", "submit", "--dry-run", "--backend", "jobset", *GKE, "--num-slices", "3",
              "--topology", "4x4x8", "--queue", "lq", "--config.train.init_from=gs://b/s1/export")
  assert result.returncode == 0, result.stderr
  before, doc = manifest_from(result.stdout)
  assert [shlex.split(l) for l in before] == [
      ["gcloud", "container", "clusters", "get-credentials", "c1", f"--location={ZONE}", "--project=proj"]]
  assert doc["kind"] == "JobSet" and doc["metadata"]["name"] == NAME
  assert doc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "lq"
  assert doc["spec"]["failurePolicy"]["maxRestarts"] == 50
  [rjob] = doc["spec"]["replicatedJobs"]
  assert rjob["replicas"] == 3
  job = rjob["template"]["spec"]
  assert job["parallelism"] == job["completions"] == 32  # v5p-256: 128 chips, 4 per host
  pod = job["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                 "cloud.google.com/gke-tpu-topology": "4x4x8"}
  [container] = pod["containers"]
  assert container["image"] == "img:1"
  assert container["resources"]["limits"]["google.com/tpu"] == 4
  assert container["command"] == ["nextstep-jax"] + TRAIN + [
      "--config.mesh.dcn_data=3", "--config.train.init_from=gs://b/s1/export"]
  assert sh.calls() == []


def test_jobset_render_small_v5e_slice_without_queue(sh):
  result = sh("gke.sh", "render", "--backend", "jobset", *GKE[:4], "--tpu-type", "v5litepod-16",
              "--topology", "4x4", "--docker-image", "img:1", '--config.data.name=a "quoted" name')
  assert result.returncode == 0, result.stderr
  doc = yaml.safe_load(result.stdout)
  assert "kueue.x-k8s.io/queue-name" not in doc["metadata"]["labels"]
  job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["parallelism"] == 4 and doc["spec"]["replicatedJobs"][0]["replicas"] == 1
  container = job["template"]["spec"]["containers"][0]
  assert container["command"][-1] == '--config.data.name=a "quoted" name'
  assert "--config.mesh.dcn_data=1" not in container["command"]


@pytest.mark.parametrize("backend,command,expected", [
    ("xpk", "delete", [["xpk", "workload", "delete", "--cluster=c1", f"--workload={NAME}", "--project=proj",
                        f"--zone={ZONE}"]]),
    ("xpk", "status", [["xpk", "workload", "list", "--cluster=c1", f"--filter-by-job={NAME}", "--project=proj",
                        f"--zone={ZONE}"]]),
    ("jobset", "delete", [["kubectl", "delete", "jobset", NAME, "--namespace=default"]]),
    ("jobset", "logs", [["kubectl", "logs", "--namespace=default", f"--selector=jobset.sigs.k8s.io/jobset-name={NAME}",
                         "--prefix", "--tail=50", "--max-log-requests=1000"]]),
])
def test_gke_status_logs_delete(sh, backend, command, expected):
  creds = ["gcloud", "container", "clusters", "get-credentials", "c1", f"--location={ZONE}", "--project=proj"]
  out = commands(sh("gke.sh", command, "--dry-run", "--backend", backend, "--stage", "stage1_256px",
                    "--cluster", "c1", "--zone", ZONE, "--project", "proj"))
  assert out == ([] if backend == "xpk" else [creds]) + expected


# ---- argument errors -------------------------------------------------------------------------

def _without(args, *options):
  out = list(args)
  for opt in options:
    i = out.index(opt)
    del out[i:i + 2]
  return out


def _with(args, opt, value):
  out = list(args)
  out[out.index(opt) + 1] = value
  return out


@pytest.mark.parametrize("script,args,message", [
    ("tpu_vm.sh", ["up", *_without(POD, "--workdir")], "--workdir is required"),
    ("tpu_vm.sh", ["up", *_with(POD, "--accelerator-type", "v5p256")], "unknown accelerator type 'v5p256'"),
    ("tpu_vm.sh", ["create", *_with(POD, "--accelerator-type", "tpu-v5p-256")], "unknown accelerator type"),
    ("tpu_vm.sh", ["up", *POD, "--num-slices", "0"], "--num-slices must be an integer >= 1 (got '0')"),
    ("tpu_vm.sh", ["up", *POD, "--num-slices", "two"], "--num-slices must be an integer >= 1 (got 'two')"),
    ("tpu_vm.sh", ["up", *_with(POD, "--stage", "stage9")], "unknown stage 'stage9'"),
    ("tpu_vm.sh", ["up", *_without(POD, "--zone")], "--zone is required"),
    ("tpu_vm.sh", ["up", *_without(POD, "--package-source")], "--package-source is required"),
    ("tpu_vm.sh", ["up", *_with(POD, "--package-source", "https://x/y.zip")], "is not git+URL"),
    ("tpu_vm.sh", ["up", *POD, "--mode", "vm", "--num-slices", "2"], "needs --mode qr"),
    ("tpu_vm.sh", ["up", *POD, "--preemptible"], "queued resources use --spot"),
    ("tpu_vm.sh", ["up", *POD, "--spot", "--reserved"], "choose one of --spot, --preemptible, --reserved"),
    ("tpu_vm.sh", ["up", *POD, "--num-slices", "2", "--config.mesh.dcn_data=4"], "contradicts --num-slices 2"),
    ("tpu_vm.sh", ["up", *_with(POD, "--workdir", "/tmp/run")], "--staging-dir gs://... is required"),
    ("tpu_vm.sh", ["up", *POD, "--bogus"], "unknown option '--bogus'"),
    ("tpu_vm.sh", ["install", *POD, "--python", "3"], "--python takes a version like 3.12 (got '3')"),
    ("tpu_vm.sh", ["train", *_with(POD, "--stage", "x")], "unknown stage 'x'"),
    ("tpu_vm.sh", ["train", *_without(POD, "--stage"), "--config", "/abs/c.py", "--name", "n1"],
     "--config must be a .py path under configs/"),
    ("tpu_vm.sh", ["launch", *POD], "unknown command 'launch'"),
    ("tpu_vm.sh", [], "a command is required"),
    ("gke.sh", ["submit", *_without(GKE, "--docker-image")], "--docker-image is required"),
    ("gke.sh", ["submit", *GKE, "--num-slices", "-1"], "--num-slices must be an integer >= 1"),
    ("gke.sh", ["submit", *_with(GKE, "--tpu-type", "v5p")], "unknown accelerator type 'v5p'"),
    ("gke.sh", ["submit", *_without(GKE, "--cluster")], "--cluster is required"),
    ("gke.sh", ["submit", *GKE, "--backend", "jobset"], "--topology is required"),
    ("gke.sh", ["submit", *GKE, "--backend", "jobset", "--topology", "4x4x4"], "has 64 chips but v5p-256 has 128"),
    ("gke.sh", ["submit", *GKE, "--backend", "k8s"], "--backend must be xpk or jobset"),
    ("gke.sh", ["render", *_with(GKE, "--tpu-type", "v3-32"), "--backend", "jobset", "--topology", "4x4"],
     "not offered on GKE"),
])
def test_bad_arguments_fail_with_one_clear_line(sh, script, args, message):
  result = sh(script, *args, "--dry-run")
  assert result.returncode == 2
  assert result.stdout == ""
  errors = [l for l in result.stderr.splitlines() if "warning:" not in l]
  assert len(errors) == 1 and errors[0].startswith(f"{script}: error: ") and message in errors[0], result.stderr
  assert sh.calls() == []


def test_non_gcs_workdir_warns_but_runs(sh):
  result = sh("gke.sh", "submit", "--dry-run", *_with(GKE, "--workdir", "/mnt/shared/run"))
  assert result.returncode == 0
  assert "warning: --workdir '/mnt/shared/run' is not a gs:// path; multi-host training needs storage" in result.stderr
  pod = sh("tpu_vm.sh", "train", "--dry-run", *_with(POD, "--workdir", "/mnt/shared/run"),
           "--staging-dir", "gs://b/staging")
  assert pod.returncode == 0 and "is not a gs:// path" in pod.stderr
  assert "--workdir /mnt/shared/run" in remote(commands(pod)[0])


@pytest.mark.parametrize("script", ["tpu_vm.sh", "gke.sh"])
def test_help(sh, script):
  result = sh(script, "--help")
  assert result.returncode == 0 and result.stdout.startswith(f"Usage: launch/{script} COMMAND")
  assert "--dry-run" in result.stdout
