"""`nextstep-jax demo`: the whole NextStep-1 recipe, small enough for a CPU, end to end and resumable.

Phases (each skips when its output is complete; an interrupted phase resumes or restarts):
  1 data     synthetic shapes dataset, TFDS ArrayRecord (`data build --kind shapes`)     WORKDIR/data/shapes
  2 vae      Flux-architecture VAE from random init, noise-regularised reconstruction     WORKDIR/vae (model dir)
             (checkpointed: WORKDIR/vae_train)
  3 encode   latent cache of the dataset with that VAE (`data encode`)                    WORKDIR/data/latents
  4 train    NextStep (backbone + flow head) through `train()` — the `nextstep-jax train`   WORKDIR/train/export
             code path — with the stage config (configs/demo/stage1.py) and the paths above as overrides
  5 sample   held-out prompts with CFG; also the untrained model (chance level), the ground-truth renders and
             their VAE reconstructions                                                    WORKDIR/samples/
  6 score    the shapes evaluator on every image set                                      WORKDIR/scores.json
  7 report   grid PNG, loss curves PNG, score and timing tables                           WORKDIR/report.md
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import shlex
import time
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

from nextstep_jax.config import ModelConfig, VAEConfig, apply_overrides, load_config, to_json
from nextstep_jax.data.builders import build_dataset
from nextstep_jax.data.latent_cache import encode_with_model
from nextstep_jax.data.shapes import held_out_scenes, render
from nextstep_jax.demo import DEFAULT_CONFIG, report
from nextstep_jax.demo.vae import load_images, save_vae_model, train_vae
from nextstep_jax.eval.shapes_scorer import score_batch, score_image
from nextstep_jax.images import to_float, to_uint8
from nextstep_jax.models.flux_vae import decode_latents, encode_latents
from nextstep_jax.models.nextstep import init_fn
from nextstep_jax.params_io import param_metadata
from nextstep_jax.sampling.pipeline import Options, Sampler
from nextstep_jax.train.loop import train
from nextstep_jax.train.metrics import read_history

PHASES = (("data", "shapes dataset (`data build`)"), ("vae", "VAE training"), ("encode", "latent cache (`data encode`)"),
          ("train", "NextStep training (`train`)"), ("sample", "sampling"), ("score", "scoring"), ("report", "report"))
IMAGE_SETS = (("ground_truth", "ground-truth renders"), ("reconstruction", "VAE reconstructions of the renders"),
              ("trained", "**trained model**"), ("untrained", "untrained model (0 steps, chance level)"))


@dataclasses.dataclass(frozen=True)
class DemoPaths:
  root: Path

  def __getattr__(self, name):  # only called for names that are not fields
    sub = {"shapes": "data/shapes", "latents": "data/latents", "vae": "vae", "vae_train": "vae_train",
           "train": "train", "export": "train/export", "samples": "samples/samples.npz", "grid": "samples/grid.png",
           "grid_untrained": "samples/grid_untrained.png", "scores": "scores.json", "curves": "loss_curves.png",
           "report": "report.md", "state": "demo_state.json", "config": "demo_config.json"}
    if name not in sub:
      raise AttributeError(name)
    return self.root / sub[name]


def path_overrides(paths: DemoPaths) -> list[str]:
  """The `--config.…` overrides that point the stage config at this workdir's dataset, tokenizer and VAE."""
  source = json.dumps({"name": "shapes", "path": str(paths.latents), "weight": 1.0, "kind": "t2i"})
  return [f"--config.data.sources=[{source}]", f"--config.data.tokenizer={paths.vae / 'tokenizer'}",
          f"--config.train.vae_from={paths.vae}"]


def _log(msg: str) -> None:
  print(f"[demo] {msg}", flush=True)


class _Timings:
  """Wall time per phase in WORKDIR/demo_state.json; a skipped phase keeps the time of the run that did it."""

  def __init__(self, path: Path):
    self.path = path
    self.data = json.loads(path.read_text()) if path.is_file() else {}
    self.data.setdefault("phases", {})

  @contextlib.contextmanager
  def phase(self, index: int, name: str, done: bool, what: str):
    head = f"phase {index}/{len(PHASES)} {name}: {what}"
    if done:
      _log(f"{head} — complete, skipped")
      yield False
      return
    _log(f"{head} …")
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    yield True
    dt = time.perf_counter() - t0
    self.data["phases"][name] = {"seconds": dt, "cpu_seconds": _cpu_seconds() - cpu0,
                                 "load_avg_1m_end": os.getloadavg()[0]}
    self.save()
    _log(f"{head} — done in {dt:.1f} s")

  def save(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text(json.dumps(self.data, indent=2, sort_keys=True))


def _cpu_seconds() -> float:
  """User + system CPU time of this process (all threads) and its finished children."""
  return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                resource.getrusage(resource.RUSAGE_CHILDREN)))


def _dataset_done(path: Path, builder: str) -> bool:
  return (path / builder / "1.0.0" / "dataset_info.json").is_file()


def _model_dir_done(path: Path, *parts: str) -> bool:
  return (path / "nextstep_config.json").is_file() and all((path / p).is_dir() for p in parts)


def _export_done(paths: DemoPaths, steps: int) -> bool:
  if not _model_dir_done(paths.export, "params", "vae_params", "tokenizer"):
    return False
  return json.loads((paths.export / "nextstep_config.json").read_text()).get("train", {}).get("step") == steps


def train_command(config_path: str, workdir: Path, overrides: Sequence[str]) -> str:
  quoted = [shlex.quote(o) for o in overrides]
  return " ".join(["nextstep-jax train --config", shlex.quote(config_path), "--workdir", shlex.quote(str(workdir)), *quoted])


def run_demo(workdir: str | os.PathLike, config_path: str | None = None, overrides: Sequence[str] = ()) -> dict:
  """Runs (or resumes) the demo in `workdir`; returns the scores (`scores.json`)."""
  config_path = config_path or DEFAULT_CONFIG
  paths = DemoPaths(Path(workdir).resolve())
  cfg = load_config(config_path, overrides)
  stage_overrides = [*overrides, *path_overrides(paths)]
  apply_overrides(cfg, path_overrides(paths))
  d = cfg.demo
  paths.root.mkdir(parents=True, exist_ok=True)
  if paths.config.is_file() and paths.config.read_text() != to_json(cfg):
    _log(f"warning: the config differs from the one {paths.root} was started with; completed phases are kept "
         f"(delete the workdir, or the phase outputs, to redo them)")
  paths.config.write_text(to_json(cfg))
  _enable_compilation_cache(paths.root / "jax_cache")
  timings = _Timings(paths.state)
  _log(f"workdir {paths.root} · config {config_path} ({d.variant}) · {os.cpu_count()} CPUs, load average "
       f"{os.getloadavg()[0]:.1f}")

  with timings.phase(1, "data", _dataset_done(paths.shapes, "ns_shapes"),
                     f"{d.num_examples} shapes images at {d.image_size}×{d.image_size}") as run:
    if run:
      build_dataset("shapes", paths.shapes, num=d.num_examples, size=d.image_size, seed=d.data_seed, overwrite=True)

  with timings.phase(2, "vae", _model_dir_done(paths.vae, "vae_params", "tokenizer"),
                     f"Flux-architecture VAE from random init, {d.vae_steps} steps") as run:
    if run:
      vae_cfg = VAEConfig.from_dict(cfg.vae)
      params = train_vae(vae_cfg, load_images(paths.shapes), paths.vae_train, d)
      save_vae_model(paths.vae, vae_cfg, params, d.vae_steps, tokenizer=d.get("tokenizer", "bytes"))

  with timings.phase(3, "encode", _dataset_done(paths.latents, "ns_latent_t2i"), "cache the VAE latents") as run:
    if run:
      _, counts = encode_with_model(paths.shapes, paths.latents, paths.vae, batch_size=d.encode_batch,
                                    resolution=d.image_size, buckets="fixed", overwrite=True)
      _log(f"encoded {counts.get('encoded', 0)} images")

  with timings.phase(4, "train", _export_done(paths, cfg.train.steps),
                     f"NextStep, {cfg.train.steps} steps of {cfg.data.global_batch_size}") as run:
    if run:
      _log("same as: " + train_command(config_path, paths.train, stage_overrides))
      result = train(cfg, str(paths.train))
      if result.preempted:
        raise SystemExit("[demo] training was stopped (SIGTERM); run the demo again to resume")

  with timings.phase(5, "sample", paths.samples.is_file(), f"{d.eval_prompts} held-out prompts") as run:
    if run:
      sample_all(cfg, paths)

  with timings.phase(6, "score", paths.scores.is_file(), "shapes evaluator") as run:
    if run:
      score_all(paths)

  with timings.phase(7, "report", False, "report.md") as run:
    write_report(cfg, paths, timings.data, config_path)
  scores = json.loads(paths.scores.read_text())
  t = scores["trained"]
  _log(f"held-out prompts fully correct: {100 * t['fully_correct']:.1f}% (single object "
       f"{100 * t['fully_correct_single']:.1f}%, two objects {100 * t['fully_correct_two']:.1f}%); "
       f"untrained: {100 * scores.get('untrained', {}).get('fully_correct', float('nan')):.1f}%")
  _log(f"report: {paths.report}")
  return scores


def _enable_compilation_cache(default_dir: Path) -> None:
  """JAX's persistent compilation cache (WORKDIR/jax_cache unless one is configured): a resumed demo, and the
  untrained-model sampler (same program as the trained one), skip XLA compilation."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(default_dir))


# ----------------------------------------------------------------------------------------------- sampling


def sampling_options(cfg) -> Any:
  s, size = cfg.demo.sample, cfg.demo.image_size
  return Options(height=size, width=size, cfg=s.cfg, steps=s.steps, method=s.method, shift=s.shift,
                 use_norm=s.use_norm, cfg_schedule=s.cfg_schedule, seed=s.seed, positive_prompt=None,
                 negative_prompt="", independent_noise=s.independent_noise)


def untrained_params(cfg) -> Any:
  """The parameters `train()` starts from (same init function and key): the model after zero steps."""
  _, init = init_fn(ModelConfig.from_dict(cfg.model))
  return nn.unbox(jax.jit(init)(jax.random.fold_in(jax.random.key(cfg.train.seed), 1)))


def sample_all(cfg, paths: DemoPaths) -> None:
  """samples.npz: prompts and uint8 images of every image set (IMAGE_SETS), one per held-out prompt."""
  d = cfg.demo
  scenes = held_out_scenes(d.eval_prompts, d.eval_seed)
  prompts = [s.caption for s in scenes]
  sampler = Sampler.from_checkpoint(paths.export)
  opts = sampling_options(cfg)
  out = {"prompts": np.asarray(prompts)}
  res = sampler.text_to_image(prompts, opts)
  _log(f"trained model: {len(prompts)} images, compile {res.compile_s:.1f} s, run {res.run_s:.1f} s")
  out["trained"] = res.images
  if d.baseline:  # same program (a persistent-compilation-cache hit), untrained parameters
    baseline = Sampler(sampler.cfg, jax.device_put(untrained_params(cfg), sampler.param_shardings), sampler.vae_cfg,
                       sampler.vae_params, sampler.tokenizer, sampler.mesh, sampler.param_shardings)
    res = baseline.text_to_image(prompts, opts)
    _log(f"untrained model: compile {res.compile_s:.1f} s, run {res.run_s:.1f} s")
    out["untrained"] = res.images
  gt = np.stack([render(s, d.image_size) for s in scenes])
  z = encode_latents(sampler.vae_params, sampler.vae_cfg, to_float(gt))
  out["ground_truth"] = gt
  out["reconstruction"] = np.asarray(to_uint8(np.asarray(decode_latents(sampler.vae_params, sampler.vae_cfg, z))))
  paths.samples.parent.mkdir(parents=True, exist_ok=True)
  tmp = paths.samples.with_name("samples.tmp.npz")
  np.savez_compressed(tmp, **out)
  tmp.rename(paths.samples)


def score_all(paths: DemoPaths) -> dict:
  """scores.json: `score_batch` of every image set, plus the per-image verdicts of the trained model."""
  data = np.load(paths.samples)
  prompts = [str(p) for p in data["prompts"]]
  scores = {name: score_batch(data[name], prompts) for name, _ in IMAGE_SETS if name in data.files}
  scores["verdicts"] = {name: [bool(score_image(im, p)["fully_correct"]) for im, p in zip(data[name], prompts)]
                        for name in ("trained", "untrained") if name in data.files}
  paths.scores.write_text(json.dumps(scores, indent=2))
  return scores


# ----------------------------------------------------------------------------------------------- report


def write_report(cfg, paths: DemoPaths, state: dict, config_path: str) -> Path:
  d = cfg.demo
  data = np.load(paths.samples)
  scores = json.loads(paths.scores.read_text())
  prompts = [str(p) for p in data["prompts"]]
  verdicts = scores["verdicts"]
  for name, path in (("trained", paths.grid), ("untrained", paths.grid_untrained)):
    if name in data.files:
      report.save_png(path, report.verdict_grid(data[name], verdicts.get(name), d.grid_cols, d.grid_scale))
  report.loss_curves(read_history(paths.train), read_history(paths.vae_train), paths.curves)
  n_params = _param_count(paths.export)
  s = d.sample
  rel = lambda p: os.path.relpath(p, paths.root)
  lines = [
      "# NextStep-JAX demo report", "",
      f"A NextStep model ({n_params / 1e6:.2f} M parameters: Qwen2-style backbone + flow-matching head) trained "
      f"from scratch on {d.num_examples} synthetic shapes images ({d.image_size}×{d.image_size} px), with a "
      f"Flux-architecture VAE trained from random initialisation in the same run; every image below comes from a "
      f"held-out prompt draw (`held_out_prompts({d.eval_prompts}, seed={d.eval_seed})`).", "",
      "## Samples (trained model)", "",
      f"![samples]({rel(paths.grid)})", "",
      "Row-major, one image per prompt; green frame = fully correct (colour, shape, count and position) by "
      "the shapes evaluator, red = not. Untrained model, same prompts and sampler: "
      f"[{rel(paths.grid_untrained)}]({rel(paths.grid_untrained)}).", "",
      f"## Scores ({len(prompts)} held-out prompts, {scores['trained']['n_relation']} with two objects)", "",
      report.score_table({label: scores[name] for name, label in IMAGE_SETS if name in scores}), "",
      "Position is over two-object prompts only. Ground truth and reconstructions bound what the pipeline can "
      "reach (evaluator and VAE); the untrained model is the chance level of the same pipeline.", "",
      "## Loss curves", "", f"![loss curves]({rel(paths.curves)})", "",
      "## Runtime", "",
      report.timing_table(state.get("phases", {}), PHASES), "",
      f"Wall time on this machine ({os.cpu_count()} CPUs); `demo_state.json` has the load average at the end of "
      "each phase (other processes slow the demo down).", "",
      "## Settings", "",
      f"- VAE: Flux architecture, ch {cfg.vae.ch}, ch_mult {tuple(cfg.vae.ch_mult)} (f{2 ** (len(cfg.vae.ch_mult) - 1)}), "
      f"{cfg.vae.num_res_blocks} res block(s), {cfg.vae.z_channels} latent channels; {d.vae_steps} steps of "
      f"{d.vae_batch}, Adam lr {d.vae_lr}, L1 {d.vae_l1} + L2 {d.vae_l2}, latent noise γ = {d.vae_noise_gamma}",
      f"- model: hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers, {cfg.model.num_heads} heads "
      f"({cfg.model.num_kv_heads} KV), flow head {cfg.model.fm_head_layers}×{cfg.model.fm_head_dim} "
      f"(batch_mul {cfg.model.fm_head_batch_mul}); {cfg.train.steps} steps of {cfg.data.global_batch_size}, "
      f"lr {cfg.train.lr} → {cfg.train.end_lr} ({cfg.train.schedule}), drop_text_prob {cfg.data.drop_text_prob}, "
      f"{d.get('tokenizer', 'bytes')} tokenizer",
      f"- sampler: {s.method}, {s.steps} steps, CFG {s.cfg} ({s.cfg_schedule}), shift {s.shift}, "
      f"use_norm {s.use_norm}, negative prompt \"\"", "",
      "## Reproduce", "",
      "```bash", f"nextstep-jax demo --workdir {paths.root}" + (f" --config {config_path}" if config_path != DEFAULT_CONFIG
                                                                 else ""),
      f"nextstep-jax sample --checkpoint {paths.export} --prompt \"{prompts[0]}\" --size {d.image_size}x{d.image_size} "
      f"--cfg {s.cfg} --steps {s.steps} --sampler {s.method} --shift {s.shift}{'' if s.use_norm else ' --no-norm'} "
      f"--positive-prompt \"\" --negative-prompt \"\" --out out.png", "```", "",
      "<details><summary>Prompts and verdicts (trained model)</summary>", "",
      "| # | prompt | fully correct |", "|---:|---|:---:|",
      *[f"| {i + 1} | {p} | {'✓' if ok else '✗'} |" for i, (p, ok) in enumerate(zip(prompts, verdicts["trained"]))],
      "", "</details>", ""]
  paths.report.write_text("\n".join(lines))
  return paths.report


def _param_count(model_dir: Path) -> int:
  return sum(int(np.prod(shape)) for shape, _ in param_metadata(model_dir / "params").values())
