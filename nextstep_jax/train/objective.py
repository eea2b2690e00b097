"""The interface every training objective implements; `train/registry.py` maps `config.train.objective` to one.

An objective owns what differs between, say, flow-matching pre-training and DPO: its config section (a typed view),
its batches (synthetic and real), the extra batch entries it needs beyond the t2i contract, the jitted step and the
inputs bound into it (e.g. a frozen reference model), and its analytic FLOPs. `loop.train` and the AOT lowering
pick an objective once and call only these methods, so adding an objective is one file plus one registry row.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import optax

from nextstep_jax.config import ModelConfig
from nextstep_jax.train.config import TrainConfig
from nextstep_jax.train.flops import StepFlops
from nextstep_jax.train.state import TrainState, load_init_params
from nextstep_jax.train.synthetic import synthetic_batch, synthetic_iterator


@dataclasses.dataclass(frozen=True)
class StepContext:
  """Everything a step needs to be built: model, run settings, the objective's own section, optimizer, layout."""
  cfg: ModelConfig
  run: TrainConfig
  section: Any  # the objective's typed config section (None if it has none)
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: TrainState
  batch_shardings: dict[str, Any]
  mesh: jax.sharding.Mesh
  init_rng: jax.Array  # the key the fresh state was initialised with (rebuilds initial params on resume)
  workdir: str = ""  # the run's WORKDIR ("" when lowering ahead of time)


@dataclasses.dataclass
class StepProgram:
  """A jitted step `fn(state, [bound,] batch, key) → (state, metrics)` with its bound inputs, if any (real arrays
  when training, ShapeDtypeStructs when lowering ahead of time; e.g. DPO's frozen reference)."""
  jitted: Any
  bound: Any = None

  def _args(self, state, batch, key) -> tuple:
    return (state, batch, key) if self.bound is None else (state, self.bound, batch, key)

  def __call__(self, state: TrainState, batch: dict[str, jax.Array], key: jax.Array):
    return self.jitted(*self._args(state, batch, key))

  def lower(self, state: Any, batch: dict[str, Any], key: Any):
    return self.jitted.lower(*self._args(state, batch, key))


def jit_step(step: Callable, state_shardings: TrainState, batch_shardings: dict[str, Any], mesh,
             bound_shardings: Any = None, donate: bool = True):
  """jit of `step(state, [bound,] batch, key)` with explicit in/out shardings: the state is donated, bound inputs
  (present when `bound_shardings` is given) are not. Trace it under `sharding.use_mesh(mesh)`."""
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  bound = () if bound_shardings is None else (bound_shardings,)
  return jax.jit(step, in_shardings=(state_shardings, *bound, batch_shardings, rep),
                 out_shardings=(state_shardings, rep), donate_argnums=(0,) if donate else ())


class Objective:
  """Base class: a flow-matching-shaped objective over t2i-contract batches. Subclasses override what differs."""
  name: str = ""
  section_name: str | None = None  # the config section this objective owns (e.g. "dpo")

  def config_view(self, config) -> Any:
    """The validated view of the objective's own section (None if it has none); raises ConfigError."""
    return None

  def synthetic_batch(self, cfg: ModelConfig, index: int, batch: int, seq_len: int, image_tokens: int,
                      seed: int) -> dict:
    """One synthetic global batch (numpy) of this objective's batch contract."""
    return synthetic_batch(cfg, index, batch, seq_len, image_tokens, seed)

  def dataset_iterator(self, data_config, process_index: int, process_count: int) -> Iterator:
    """Process-local batches from the datasets of `config.data`."""
    raise NotImplementedError

  def data_iterator(self, config, cfg: ModelConfig, run: TrainConfig, process_index: int,
                    process_count: int) -> Iterator:
    """Process-local batches: synthetic (`config.train.synthetic_data`) or from `config.data`."""
    if run.synthetic_data:
      d = config.data
      return synthetic_iterator(cfg, d.global_batch_size, d.seq_len, d.max_image_tokens or d.seq_len, d.seed,
                                process_index, process_count, make_batch=self.synthetic_batch)
    return self.dataset_iterator(config.data, process_index, process_count)

  def batch_extras(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Global shapes of the batch entries this objective adds to the t2i contract (float32), for AOT."""
    return {}

  def trainable_init(self, cfg: ModelConfig, section: Any) -> Callable[[jax.Array], Any] | None:
    """`init(rng)` → the boxed (logically named) tree the train state optimises; None: the model's params."""
    return None

  def initial_params(self, run: TrainConfig, cfg: ModelConfig, mesh) -> Any:
    """Params merged into a fresh state: `config.train.init_from`'s (None: a fresh init)."""
    return load_init_params(run.init_from, cfg, mesh) if run.init_from else None

  def export_params(self, ctx: StepContext, program: StepProgram, params: Any) -> Any:
    """The model params to export / sample with, given the state's (EMA-resolved) params."""
    return params

  def extra_exports(self, ctx: StepContext, workdir: str, params: Any, step: int) -> None:
    """Anything the objective writes next to WORKDIR/export (e.g. LoRA's adapters alone)."""

  def make_step(self, ctx: StepContext, init_params: Any = None) -> StepProgram:
    """The step with its real bound inputs; `init_params`: the fresh state's params (None on resume)."""
    raise NotImplementedError

  def abstract_step(self, ctx: StepContext, abstract_state: TrainState) -> StepProgram:
    """The same step with abstract bound inputs (ShapeDtypeStructs carrying shardings), for AOT lowering."""
    raise NotImplementedError

  def step_flops(self, cfg: ModelConfig, rows: int, seq_len: int, image_tokens: int, section=None) -> StepFlops:
    """Analytic FLOPs of one step over `rows` × `seq_len` with `image_tokens` image tokens; `section` is the
    objective's config view (`config_view`), for objectives whose cost depends on it."""
    raise NotImplementedError
