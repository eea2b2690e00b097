"""The 14B stage × TPU pod table of docs/AOT.md, produced by `nextstep-jax aot` (one subprocess per compile).

  python -m benchmarks.aot_table --results /tmp/aot.jsonl            # compile the matrix (resumable), print markdown
  python -m benchmarks.aot_table --results /tmp/aot.jsonl --render   # markdown from existing results only

Every stage config in configs/nextstep1_14b/ (stage1_256px … edit, dpo when present) runs its train step on each
pod, plus the 512 px text-to-image sampler. A stage runs with its own defaults on its recommended pod; on the
other pods the script applies that pod's layout (`pod_overrides`: micro-batches for a rows-per-chip target,
tensor parallelism on v5e) and the table lists those overrides. Stages whose compiled programs are identical
apart from the learning-rate schedule (same model, batch shapes, mesh and micro-batches) are compiled once per
pod (`--all` compiles each). 14B compiles take 5-10 minutes each on a 2-core machine; run one at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CONFIG_DIR = os.path.join("configs", "nextstep1_14b")
STAGES = ("stage1_256px", "stage2_512px", "anneal_512px", "sft", "edit", "dpo")
PODS = ("v5p-128", "v5p-256", "v5e-256", "v6e-256", "v4-64")
# the pod each stage's defaults (configs/nextstep1_14b/<stage>.py) are tuned for
RECOMMENDED = {"stage1_256px": "v5p-256", "stage2_512px": "v5p-256", "anneal_512px": "v5p-128", "sft": "v5p-128",
               "edit": "v5p-128", "dpo": "v5p-128", "sampler": "v5p-128"}
SAMPLER_CONFIG = "anneal_512px"  # the sampler row: its model at 512 px, official settings (50 steps, CFG)
# per pod: tensor-parallel size and packed 8192-token rows per chip per micro-batch (per tensor group)
LAYOUT = {"v5p": (1, 1), "v5e": (4, 1), "v6e": (1, 1), "v4": (1, 1)}


def pod_overrides(stage_config, pod: str) -> list[str]:
  """The mesh / micro-batch overrides that run `stage_config` on `pod` (empty where the defaults already do)."""
  from nextstep_jax.tpu_topology import pod_type
  p = pod_type(pod)
  tensor, rows = LAYOUT[p.name.split("-")[0]]
  batch = int(stage_config.data.global_batch_size)
  tensor = max(tensor, p.num_chips // batch)  # fewer rows than chips: shard the model, not the batch
  groups = p.num_chips // tensor
  micro = max(1, batch // (groups * rows))
  want = {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": tensor, "train.microbatches": micro}
  have = {k: stage_config[k.split(".")[0]][k.split(".")[1]] for k in want}
  return [f"--config.{k}={v}" for k, v in want.items() if have[k] != v]


def _signature(program: str, pod: str, config) -> str:
  """What determines the compiled program: everything but the learning-rate schedule and the data sources."""
  d = config.to_dict()
  d["train"] = {k: v for k, v in d["train"].items() if k in ("microbatches", "objective")}
  d["data"] = {k: v for k, v in d["data"].items() if k in ("global_batch_size", "seq_len", "max_image_tokens",
                                                             "encode_on_the_fly")}
  return json.dumps([program, pod, d], sort_keys=True, default=str)


def _cells(stages: list[str], pods: list[str], dedupe: bool):
  """(row name, program, config path, pod, overrides, the row whose identical program it reuses or None)."""
  from nextstep_jax.config import load_config
  seen = {}
  for stage in stages + ["sampler"]:
    path = os.path.join(CONFIG_DIR, f"{SAMPLER_CONFIG if stage == 'sampler' else stage}.py")
    program = "sample" if stage == "sampler" else "train"
    config = load_config(os.path.join(ROOT, path))
    for pod in pods:
      over = [] if program == "sample" or pod == RECOMMENDED[stage] else pod_overrides(config, pod)
      sig = _signature(program, pod, load_config(os.path.join(ROOT, path), over))
      same = seen.get(sig) if dedupe else None
      seen.setdefault(sig, stage)
      yield stage, program, path, pod, over, same


def run_cell(program: str, path: str, pod: str, overrides: list[str], timeout: int) -> dict:
  cmd = [sys.executable, "-m", "nextstep_jax.cli", "aot", "--config", path, "--topology", pod, "--program", program,
         "--json", *overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  t0 = time.perf_counter()
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
  except subprocess.TimeoutExpired:
    return dict(ok=False, exit_code=124, error=f"timed out after {timeout} s")
  lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
  result = json.loads(lines[-1]) if lines else dict(ok=False, exit_code=out.returncode,
                                                     error=(out.stderr.strip().splitlines() or ["no output"])[-1])
  result["wall_s"] = time.perf_counter() - t0
  return result


def _load(results_path: str) -> dict:
  done = {}
  if os.path.exists(results_path):
    for line in open(results_path):
      r = json.loads(line)
      done[(r["row"], r["pod"])] = r
  return done


def compile_matrix(results_path: str, stages: list[str], pods: list[str], dedupe: bool, timeout: int) -> None:
  done = _load(results_path)
  for stage, program, path, pod, over, same in _cells(stages, pods, dedupe):
    if (stage, pod) in done or same is not None:
      continue
    print(f"[{time.strftime('%H:%M:%S')}] {stage} on {pod} {' '.join(over)}", flush=True)
    r = run_cell(program, path, pod, over, timeout)
    r.update(row=stage, pod=pod, overrides=over, config=path)
    print(f"    → {_verdict(r)} ({r['wall_s']:.0f} s)", flush=True)
    with open(results_path, "a") as f:
      f.write(json.dumps(r, default=str) + "\n")


def _verdict(r: dict) -> str:
  if r.get("ok"):
    return f"fits, {r['peak_gib']:.1f} of {r['hbm_gib']:.1f} GiB"
  if r.get("exit_code") == 3:
    need = f"{r['needed_gib']:.1f}" if r.get("needed_gib") else "more than"
    return f"does not fit ({need} of {r['hbm_gib']:.1f} GiB)"
  return f"error: {r.get('error', '?')[:120]}"


def _steps(stage: str) -> int | None:
  from nextstep_jax.train.recipe import STAGES, stage_config
  return int(stage_config(stage).train.steps) if stage in STAGES else None


def render(results_path: str, stages: list[str], pods: list[str], dedupe: bool) -> str:
  done = _load(results_path)
  compiled = {}
  lines = ["| stage | pod | overrides (beyond the stage defaults) | fits | peak GiB/chip (of usable) | compile s "
           "| step s at 50% MFU | stage days at 50% MFU |", "|---|---|---|---|---|---|---|---|"]
  for stage, program, path, pod, over, same in _cells(stages, pods, dedupe):
    group = (same or stage, pod)  # cells that compile the identical program
    r = done.get((stage, pod))  # compiled itself
    if r is not None:
      same = None
      compiled.setdefault(group, (stage, r))
    elif group in compiled:
      same, r = compiled[group]
    else:
      continue
    rec = pod == RECOMMENDED.get(stage)
    pod_cell = f"**{pod}** (rec.)" if rec else pod
    over_cell = " ".join(f"`{o.removeprefix('--config.')}`" for o in over) or "—"
    compile_cell = f"{r['compile_s']:.0f}" if r.get("ok") else "—"
    if same:
      compile_cell += f" (= {same})"
    if r.get("ok"):
      t50 = r["step_time_s"]["50%"]
      steps = _steps(stage)
      days = f"{t50 * steps / 86400:.1f}" if steps and program == "train" else "—"
      step_cell = f"{t50:.2f}" + ("" if program == "train" else " per call (optimistic)")
      lines.append(f"| {stage} | {pod_cell} | {over_cell} | yes | {r['peak_gib']:.1f} ({r['hbm_gib']:.1f}) | "
                   f"{compile_cell} | {step_cell} | {days} |")
    else:
      fits = "**no**" if r.get("exit_code") == 3 else f"error: {r.get('error', '')[:80]}"
      need = f"needs {r['needed_gib']:.1f} ({r['hbm_gib']:.1f})" if r.get("needed_gib") else "—"
      lines.append(f"| {stage} | {pod_cell} | {over_cell} | {fits} | {need} | {compile_cell} | — | — |")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--results", required=True, help="JSON-lines file of compile results (appended; resumable)")
  ap.add_argument("--render", action="store_true", help="only print the markdown table from --results")
  ap.add_argument("--stages", nargs="*", default=None, help="default: every stage config that exists")
  ap.add_argument("--pods", nargs="*", default=list(PODS))
  ap.add_argument("--all", action="store_true", help="compile every stage even when its program is a duplicate")
  ap.add_argument("--timeout", type=int, default=1800, help="seconds per compile")
  args = ap.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  stages = args.stages or [s for s in STAGES if os.path.exists(os.path.join(ROOT, CONFIG_DIR, f"{s}.py"))]
  if not args.render:
    compile_matrix(args.results, stages, args.pods, not args.all, args.timeout)
  print(render(args.results, stages, args.pods, not args.all))
  return 0


if __name__ == "__main__":
  sys.exit(main())
