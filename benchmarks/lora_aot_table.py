"""14B LoRA SFT vs full fine-tuning at 512 px on 8-chip slices (docs/LORA.md), from `nextstep-jax aot`.

  python -m benchmarks.lora_aot_table --results /tmp/lora_aot.jsonl            # compile (resumable), print markdown
  python -m benchmarks.lora_aot_table --results /tmp/lora_aot.jsonl --render   # markdown from existing results

Rows: configs/nextstep1_14b/lora_sft.py (adapters rank 16 on q,k,v,o,gate,up,down; bf16 frozen base), the same
with an int8 base (QLoRA, `--config.lora.base_dtype=int8`), the bf16 one with 4096-token rows (`lora_sft_4k`) and
configs/nextstep1_14b/sft.py (full fine-tuning: fp32 master weights + AdamW) with the LoRA run's batch shape
(16 packed 8192-token rows, all-FSDP mesh, one row per chip per micro-batch). One compile per subprocess
(benchmarks/aot_table.py: run_cell); 14B compiles take minutes each on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.aot_table import _load, _verdict, run_cell

PODS = ("v5e-8", "v6e-8", "v5p-8", "v4-8")
ROWS = {"lora_sft": "configs/nextstep1_14b/lora_sft.py", "qlora_sft": "configs/nextstep1_14b/lora_sft.py",
        "full_sft": "configs/nextstep1_14b/sft.py", "lora_sft_4k": "configs/nextstep1_14b/lora_sft.py"}
BATCH = 16


def overrides(row: str, pod: str) -> list[str]:
  from nextstep_jax.tpu_topology import pod_type
  chips = pod_type(pod).num_chips
  out = [f"--config.train.microbatches={max(1, BATCH // chips)}", "--config.mesh.fsdp=-1"]
  if row == "full_sft":
    out.append(f"--config.data.global_batch_size={BATCH}")
  if row == "qlora_sft":
    out.append("--config.lora.base_dtype=int8")
  if row == "lora_sft_4k":  # half-length packed rows (a 512 px image is 1024 tokens)
    out.append("--config.data.seq_len=4096")
  return out


def compile_all(results: str, rows: list[str], pods: list[str], timeout: int) -> None:
  done = _load(results)
  for row in rows:
    for pod in pods:
      if (row, pod) in done:
        continue
      over = overrides(row, pod)
      print(f"[{time.strftime('%H:%M:%S')}] {row} on {pod} {' '.join(over)}", flush=True)
      r = run_cell("train", ROWS[row], pod, over, timeout)
      r.update(row=row, pod=pod, overrides=over, config=ROWS[row])
      print(f"    → {_verdict(r)} ({r['wall_s']:.0f} s)", flush=True)
      with open(results, "a") as f:
        f.write(json.dumps(r, default=str) + "\n")


def render(results: str, rows: list[str], pods: list[str]) -> str:
  from nextstep_jax.tpu_topology import pod_type
  done = _load(results)
  lines = ["| pod (chips, HBM/chip) | LoRA SFT (bf16 base): peak GiB/chip | QLoRA SFT (int8 base) | LoRA, 4096-token "
           "rows | full SFT | LoRA step s at 50% MFU |", "|---|---|---|---|---|---|"]

  def cell(r):
    if r is None:
      return "not compiled"
    if r.get("ok"):
      return f"**fits**: {r['peak_gib']:.1f}"
    if r.get("exit_code") == 3:
      return f"**no**: needs {r['needed_gib']:.1f}" if r.get("needed_gib") else "**no**"
    return f"error: {r.get('error', '')[:60]}"
  for pod in pods:
    lo, ql, l4, fu = (done.get((row, pod)) for row in ("lora_sft", "qlora_sft", "lora_sft_4k", "full_sft"))
    any_r = lo or ql or l4 or fu
    hbm = f"{any_r['hbm_gib']:.1f} GiB" if any_r and any_r.get("hbm_gib") else "?"
    chips = pod_type(pod).num_chips
    step = f"{lo['step_time_s']['50%']:.2f}" if lo and lo.get("ok") else "—"
    lines.append(f"| {pod} ({chips}, {hbm}) | {cell(lo)} | {cell(ql)} | {cell(l4)} | {cell(fu)} | {step} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--results", required=True)
  ap.add_argument("--render", action="store_true")
  ap.add_argument("--rows", nargs="*", default=list(ROWS))
  ap.add_argument("--pods", nargs="*", default=list(PODS))
  ap.add_argument("--timeout", type=int, default=1800)
  args = ap.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if not args.render:
    compile_all(args.results, args.rows, args.pods, args.timeout)
  print(render(args.results, args.rows, args.pods))
  return 0


if __name__ == "__main__":
  sys.exit(main())
