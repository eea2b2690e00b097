"""LoRA / QLoRA fine-tuning ("lora"): the flow-matching objective (`train/step.py`) trained through low-rank
adapters (`models/lora.py`) on a frozen base.

The train state's params are the adapters only ({"lora": …}, fp32, born sharded by the rule table through the
base kernels' logical axes), so the optimizer never sees the base and checkpoints hold megabytes. The base —
`config.train.init_from`, a params-only model directory (a converted release checkpoint or a stage's export) —
is a bound input of the step, loaded on every start with its matrices in `config.lora.base_dtype` (bfloat16, or
int8 with per-channel scales = QLoRA; a directory converted with `--quantize int8` is used as stored) on the
shardings of the model's rules. WORKDIR/lora_base.json records the base's path and fingerprint; a resume onto
another base is refused. The export is the merged model (kernel + a·b·alpha/r) — a plain model directory that
`sample`, `serve` and `convert export-nextstep` read unchanged — plus WORKDIR/export_adapters (adapters alone
with the base pointer) when `config.lora.export_adapters`.

`config.lora` (`LoraConfig`): rank, alpha, dropout, targets (`models/lora.py: TARGETS`), base_dtype,
export_adapters.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from nextstep_jax import file_manifest, params_io, sharding
from nextstep_jax.config import ModelConfig
from nextstep_jax.errors import UserError
from nextstep_jax.errors import warn as errors_warn
from nextstep_jax.models import lora as lora_lib
from nextstep_jax.models import quant
from nextstep_jax.models.layers import to_dtype
from nextstep_jax.models.nextstep import NextStep, abstract_params
from nextstep_jax.paths import atomic_dir, resolve
from nextstep_jax.train import flops as flops_lib
from nextstep_jax.train.config import check, finite, section_dict, typed_view
from nextstep_jax.train.objective import StepContext, StepProgram, jit_step
from nextstep_jax.train.state import TrainState
from nextstep_jax.train.step import FlowMatching, train_step

BASE_DTYPES = ("bfloat16", "float32", "int8")
POINTER = "lora_base.json"
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """`config.lora`: adapters of rank `rank` on `targets`, scaled by alpha / rank."""
  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.0  # on the adapters' input
  targets: tuple[str, ...] = DEFAULT_TARGETS  # names of models/lora.py TARGETS ("head", "image_in", "image_out": opt.)
  base_dtype: str = "bfloat16"  # the frozen base's matrices: bfloat16 | float32 | int8 (QLoRA)
  export_adapters: bool = True  # also write WORKDIR/export_adapters (adapters + base pointer)

  @classmethod
  def from_config(cls, section: Any) -> "LoraConfig":
    return typed_view(cls, section, "config.lora").validate()

  def validate(self) -> "LoraConfig":
    p = "config.lora"
    check(self.rank > 0, f"{p}.rank={self.rank} must be a positive integer (typical: 8–64)")
    finite(self, p, "alpha", "dropout")
    check(self.alpha > 0, f"{p}.alpha={self.alpha} must be > 0 (typical: 2·rank)")
    check(0 <= self.dropout < 1, f"{p}.dropout={self.dropout} must be in [0, 1)")
    check(bool(self.targets), f"{p}.targets is empty; use some of {sorted(lora_lib.TARGETS)}")
    bad = [t for t in self.targets if t not in lora_lib.TARGETS]
    check(not bad, f"{p}.targets has unknown {bad}; use names of {sorted(lora_lib.TARGETS)}")
    check(len(set(self.targets)) == len(self.targets), f"{p}.targets={list(self.targets)} repeats a name")
    check(self.base_dtype in BASE_DTYPES, f"{p}.base_dtype={self.base_dtype!r} is not one of {BASE_DTYPES}")
    return self

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def lora_section(**overrides) -> ml_collections.ConfigDict:
  """`config.lora` with every field at its default, `overrides` applied."""
  return section_dict(LoraConfig, overrides, "config.lora")


# ----------------------------------------------------------------------------------------------- base


def base_layout(cfg: ModelConfig, lcfg: LoraConfig) -> tuple[Any, Any]:
  """(ShapeDtypeStruct tree, logical names) of the frozen base: matrices in base_dtype (int8: + scales)."""
  abstract, names = abstract_params(cfg)
  if lcfg.base_dtype == "int8":
    return quant.quantized_abstract(abstract, names, include_head=False)
  dt = to_dtype(lcfg.base_dtype)
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dt if len(a.shape) >= 2 else a.dtype), abstract), names


def base_fingerprint(model_dir: str) -> str:
  """sha256 of the base's model section and its params' file manifest (sizes + CRC-32s, written with the
  parameter set; without one: the parameters' paths, shapes and dtypes). No tensor data is read."""
  params = Path(model_dir) / "params"
  manifest = file_manifest.read(params / params_io.MANIFEST)
  if manifest:
    content = manifest["files"]
  else:
    content = sorted(("/".join(k), list(s), str(d)) for k, (s, d) in params_io.param_metadata(params).items())
  model = params_io.read_model_config(model_dir).get("model", {})
  return hashlib.sha256(json.dumps([model, content], sort_keys=True).encode()).hexdigest()[:16]


def check_base_dir(path: str, cfg: ModelConfig) -> None:
  """One line (UserError) unless `path` is a model directory whose parameters fit `config.model`."""
  if not path:
    raise UserError("config.lora needs config.train.init_from: the base model directory (a converted release "
                    "checkpoint, e.g. `nextstep-jax convert nextstep --dst DIR`, or a stage's WORKDIR/export)")
  if not Path(path, "params").exists():
    raise UserError(f"config.train.init_from={path!r} has no params/; LoRA needs a params-only model directory "
                    f"(a conversion's --dst or WORKDIR/export), not a training workdir")
  stored = params_io.param_metadata(Path(path) / "params")
  abstract, _ = abstract_params(cfg)
  for k, a in flax.traverse_util.flatten_dict(abstract).items():
    if k in stored and tuple(stored[k][0]) != tuple(a.shape):
      raise UserError(f"base {path}: params/{'/'.join(k[1:])} has shape {tuple(stored[k][0])} but config.model "
                      f"expects {tuple(a.shape)}; set config.model to the base's (its nextstep_config.json)")
    if k not in stored:
      raise UserError(f"base {path} lacks params/{'/'.join(k[1:])}; it is not a full NextStep model of this "
                      f"config.model")


def load_base(path: str, cfg: ModelConfig, lcfg: LoraConfig, mesh) -> Any:
  """The frozen base on the mesh, matrices in `base_dtype` (int8: quantized here unless stored so)."""
  check_base_dir(path, cfg)
  stored_int8 = quant.is_quantized({tuple(k): 0 for k in params_io.param_metadata(Path(path) / "params")})
  abstract, names = base_layout(cfg, lcfg)
  shardings = sharding.tree_shardings(names, abstract, mesh)
  if lcfg.base_dtype == "int8" and not stored_int8:  # host-side quantization (14B: convert with --quantize)
    host = quant.quantize_params(params_io.load_params(Path(path) / "params"))
    return jax.device_put(host, shardings)
  if stored_int8 and lcfg.base_dtype != "int8":
    raise UserError(f"base {path} holds int8 kernels; set config.lora.base_dtype=int8 (QLoRA) or use the float "
                    f"conversion")
  target = sharding.abstract_sharded(abstract, shardings)
  return params_io.load_params(Path(path) / "params", target)


def write_or_check_pointer(workdir: str, base: str) -> dict:
  """WORKDIR/lora_base.json {path, fingerprint}: written on the first start, checked on every later one."""
  pointer = {"path": resolve(base), "fingerprint": base_fingerprint(base)}
  f = Path(workdir) / POINTER
  if f.is_file():
    old = json.loads(f.read_text())
    if old.get("fingerprint") != pointer["fingerprint"]:
      raise UserError(f"{workdir} trains adapters for base {old.get('path')} (fingerprint {old.get('fingerprint')})"
                      f" but config.train.init_from={base} has fingerprint {pointer['fingerprint']}; resume with "
                      f"the original base or use a new --workdir")
    return old
  if jax.process_index() == 0:
    Path(workdir).mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(pointer, indent=2))
    os.replace(tmp, f)
  return pointer


# ----------------------------------------------------------------------------------------------- step


def lora_apply(lcfg: LoraConfig, base: Any, dropout_key: jax.Array | None, model: NextStep, adapters: Any, *args,
               **kw):
  """`model.apply` over {"params": base, "lora": adapters} with the adapters (and int8 kernels) active."""
  rngs = {"dropout": dropout_key} if lcfg.dropout > 0 and dropout_key is not None else None
  with lora_lib.lora_dense(lcfg.rank, lcfg.alpha, lcfg.dropout if rngs else 0.0), \
       quant.quantized_dense(weight_only=True):
    return model.apply({"params": base["params"], **adapters}, *args, rngs=rngs, **kw)


def lora_train_step(cfg: ModelConfig, lcfg: LoraConfig, tx, schedule, microbatches: int, state: TrainState,
                    base: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[TrainState, dict]:
  """One optimizer step of the adapters (`step.train_step`); the base is read, never differentiated or updated."""
  make_apply = lambda step_key: functools.partial(lora_apply, lcfg, base, jax.random.fold_in(step_key, 7))
  return train_step(cfg, tx, schedule, microbatches, state, batch, key, make_apply=make_apply)


def jit_lora_step(cfg: ModelConfig, lcfg: LoraConfig, tx, schedule, microbatches: int, state_shardings: TrainState,
                  batch_shardings: dict[str, Any], mesh):
  """jit of `step(state, base, batch, key)`: the adapter state donated, the base bound on the rule table's
  shardings. Trace it under `sharding.use_mesh(mesh)`."""
  abstract, names = base_layout(cfg, lcfg)
  fn = lambda state, base, batch, key: lora_train_step(cfg, lcfg, tx, schedule, microbatches, state, base, batch,
                                                       key)
  return jit_step(fn, state_shardings, batch_shardings, mesh,
                  bound_shardings=sharding.tree_shardings(names, abstract, mesh))


def merged_params(base: Any, adapters: Any, lcfg: LoraConfig, out_dtype: Any = None) -> Any:
  """Device-side merge (jit; keeps the base's shardings): every adapted kernel → kernel + a·b·alpha/r; int8
  kernels are dequantized, their scales dropped. Float kernels keep their dtype; int8 ones become `out_dtype`
  (default bfloat16)."""
  return jax.jit(functools.partial(lora_lib.merge, rank=lcfg.rank, alpha=lcfg.alpha,
                                   int8_dtype=out_dtype or jnp.bfloat16))(base, adapters)


class Lora(FlowMatching):
  """Flow matching (t2i, SFT, editing batches) through adapters on a frozen base bound into the step."""
  name, section_name = "lora", "lora"

  def config_view(self, config) -> LoraConfig:
    return LoraConfig.from_config(config.get("lora", {}))

  def trainable_init(self, cfg: ModelConfig, section: LoraConfig):
    abstract, names = abstract_params(cfg)
    layout, ad_names = lora_lib.adapter_layout(abstract, names, section.rank, section.targets)
    return lambda rng: lora_lib.init_adapters(rng, layout, ad_names)

  def initial_params(self, run, cfg, mesh):
    check_base_dir(run.init_from, cfg)  # before the state is built
    return None  # the base is bound into the step, not merged into the (adapter) state

  def _program(self, ctx: StepContext):
    with sharding.use_mesh(ctx.mesh):
      return jit_lora_step(ctx.cfg, ctx.section, ctx.tx, ctx.schedule, ctx.run.microbatches, ctx.state_shardings,
                           ctx.batch_shardings, ctx.mesh)

  def make_step(self, ctx, init_params=None):
    check_base_dir(ctx.run.init_from, ctx.cfg)
    if ctx.workdir:
      write_or_check_pointer(ctx.workdir, ctx.run.init_from)
    return StepProgram(self._program(ctx), load_base(ctx.run.init_from, ctx.cfg, ctx.section, ctx.mesh))

  def abstract_step(self, ctx, abstract_state):
    abstract, names = base_layout(ctx.cfg, ctx.section)
    base = sharding.abstract_sharded(abstract, sharding.tree_shardings(names, abstract, ctx.mesh))
    return StepProgram(self._program(ctx), base)

  def export_params(self, ctx: StepContext, program: StepProgram, params: Any) -> Any:
    return merged_params(program.bound, params, ctx.section)

  def extra_exports(self, ctx: StepContext, workdir: str, params: Any, step: int) -> None:
    if ctx.section.export_adapters:
      save_adapters(Path(workdir) / "export_adapters", params, ctx, step)

  def step_flops(self, cfg, rows, seq_len, image_tokens, section=None):
    # the base's weight gradients are not computed: ≈ 2/3 of full fine-tuning's FLOPs (adapters negligible)
    fl = flops_lib.train_step_flops(cfg, rows, seq_len, image_tokens)
    return flops_lib.StepFlops(backbone=fl.backbone * 2 / 3, head=fl.head * 2 / 3)


def save_adapters(out: Path, adapters: Any, ctx: StepContext, step: int) -> Path:
  """Adapters-only directory: params/ ({"lora": …}) + nextstep_config.json {"lora": config + base pointer}."""
  tmp = out.with_name(out.name + ".tmp")
  if jax.process_index() == 0:
    shutil.rmtree(tmp, ignore_errors=True)
  params_io.save_params(tmp / "params", adapters)
  if jax.process_index() == 0:
    base = ctx.run.init_from
    params_io.write_model_config(tmp, {
        "model": ctx.cfg, "train": {"step": step},
        "lora": dict(dataclasses.asdict(ctx.section), base={"path": resolve(base),
                                                           "fingerprint": base_fingerprint(base)})})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
  return out



def merge_adapter_dir(adapters_dir: str, dst: str, base: str | None = None, overwrite: bool = False) -> Path:
  """`nextstep-jax lora merge`: an adapters-only directory (WORKDIR/export_adapters) + its base (default: the
  recorded pointer) → a merged params-only model directory (with the base's VAE and tokenizer), host-side."""
  meta = params_io.read_model_config(adapters_dir)
  section = meta.get("lora")
  if not section:
    raise UserError(f"{adapters_dir} is not an adapters directory (no 'lora' section in its "
                    f"{params_io.CONFIG_NAME}); pass a LoRA run's WORKDIR/export_adapters")
  pointer = section.get("base", {})
  base = base or pointer.get("path")
  if not base or not Path(base, "params").exists():
    raise UserError(f"base model directory {base!r} of {adapters_dir} not found; pass --model BASE_DIR")
  stored = params_io.param_metadata(Path(base) / "params")
  flat = {k: jax.ShapeDtypeStruct(shp, dt) for k, (shp, dt) in stored.items()}
  layout = flax.traverse_util.unflatten_dict(flat)
  adapters = params_io.load_params(Path(adapters_dir) / "params")
  try:  # shapes first (metadata only), before the base is read
    lora_lib.check_compatible(layout, adapters, f"lora merge --model {base}")
  except ValueError as e:
    raise UserError(str(e)) from None
  if pointer.get("fingerprint") and base_fingerprint(base) != pointer["fingerprint"]:
    errors_warn(f"{base} differs from the base the adapters were trained on (fingerprint "
                f"{base_fingerprint(base)}, recorded {pointer['fingerprint']})")
  merged = lora_lib.merge(params_io.load_params(Path(base) / "params"), adapters, int(section["rank"]),
                          float(section["alpha"]), int8_dtype=jnp.bfloat16)
  base_meta = params_io.read_model_config(base)
  with atomic_dir(dst, overwrite=overwrite) as tmp:
    params_io.save_params(tmp / "params", jax.device_get(merged))
    for sub in ("vae_params", "tokenizer"):
      if Path(base, sub).exists():
        shutil.copytree(Path(base, sub), tmp / sub)
    params_io.write_model_config(tmp, {k: v for k, v in base_meta.items() if k != "quantization"})
  return Path(dst)
