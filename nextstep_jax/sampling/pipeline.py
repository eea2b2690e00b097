"""User-facing sampling: prompts → CFG rows (left-padded to a length bucket) → one compiled program → images.

    sampler = Sampler.from_checkpoint("ckpt/")            # a converted or exported model directory
    out = sampler.text_to_image(["a red cube"], Options(height=512, width=512, seed=0))
    out.images  # uint8 (N, H, W, 3)

Official defaults (spec §4.2): cfg 7.5, 50 steps, constant schedule, use_norm; text-to-image shift 1.0 with the
positive/negative prompts below; editing cfg_img 2.0, shift 3.2, negative prompt "Copy original image.".
Programs are cached per (rows, prompt bucket, source grid, token grid, sampler): a new prompt of another length in
the same bucket, a new seed or new cfg values run without recompiling.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nextstep_jax import params_io, sharding
from nextstep_jax.config import ModelConfig, VAEConfig
from nextstep_jax.models import quant
from nextstep_jax.models.flux_vae import encode_latents
from nextstep_jax.models.image_grid import check_grids_fit
from nextstep_jax.models.latents import patchify, token_grid
from nextstep_jax.models.nextstep import abstract_params
from nextstep_jax.sampling import decode_layout, flow
from nextstep_jax.sampling.generate import Spec, compiled_program
from nextstep_jax.tokens import NextStepTokenizer, left_pad

T2I_POSITIVE = "masterpiece, film grained, best quality."
T2I_NEGATIVE = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
                "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry.")
EDIT_NEGATIVE = "Copy original image."
DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048)


@dataclasses.dataclass(frozen=True)
class Options:
  height: int = 512
  width: int = 512
  cfg: float = 7.5
  cfg_img: float = 2.0
  cfg_schedule: str = "constant"
  steps: int = 50
  shift: float | None = None  # None: 1.0 for text-to-image, 3.2 for editing
  method: str = "sde_a"  # flow.METHODS; flow_sde / cps record per-step Gaussian transitions (Result.extras)
  noise_level: float = 0.7  # flow_sde / cps only: the SDE's noise level a (flow.py)
  step_schedule: tuple[int, ...] = ()  # per-token flow steps over equal token segments, e.g. (50, 25, 10); ≤ steps
  guidance_times: tuple[float, float] = (0.0, 1.0)  # CFG only at flow times in [lo, hi] (cond branch alone elsewhere)
  guidance_tokens: tuple[float, float] = (0.0, 1.0)  # CFG only for tokens k/n in [lo, hi)
  use_norm: bool = True
  positive_prompt: str | None = T2I_POSITIVE  # text-to-image only
  negative_prompt: str | None = None  # None: the official default of the mode
  num_images_per_prompt: int = 1
  # False: the official draws — `num_images_per_prompt` noise sequences tiled across the prompts of a batch, so
  # every prompt of one call sees the same noise (needed for parity). True: every image its own noise (evaluation,
  # preference pairs: one call then samples as many independent draws as it has images)
  independent_noise: bool = False
  seed: int = 0
  buckets: tuple[int, ...] = DEFAULT_BUCKETS
  decode: bool = True
  progress: bool = False  # tqdm bar over image tokens (one host callback per token)
  return_debug: bool | None = None  # conditions, raw head outputs in Result.extras; None: when draws are injected

  def validate(self) -> "Options":
    if not (self.cfg >= 1 and self.cfg_img >= 1):  # NaN fails too
      raise ValueError(f"cfg={self.cfg}, cfg_img={self.cfg_img}: guidance scales must be ≥ 1 (1 disables guidance)")
    if self.num_images_per_prompt < 1:
      raise ValueError("num_images_per_prompt must be ≥ 1")
    flow.guidance_scale(jnp.float32(1), self.cfg_schedule, 0, 1)  # raises on an unknown schedule
    self.flow_config(1.0)
    return self

  def flow_config(self, default_shift: float) -> flow.FlowConfig:
    """The flow part of these options (validated)."""
    return flow.FlowConfig(self.method, self.steps, default_shift if self.shift is None else self.shift,
                           step_schedule=tuple(self.step_schedule), guidance_times=tuple(self.guidance_times),
                           guidance_tokens=tuple(self.guidance_tokens), noise_level=self.noise_level).validate()


@dataclasses.dataclass
class Result:
  images: np.ndarray | None  # uint8 (N, H, W, 3)
  tokens: np.ndarray  # (N, n, token_dim)
  compile_s: float
  run_s: float
  extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class Sampler:
  """Holds params (optionally sharded over `mesh`), the tokenizer and the compiled programs."""

  def __init__(self, cfg: ModelConfig, params: Any, vae_cfg: VAEConfig | None, vae_params: Any,
               tokenizer: Any = None, mesh: jax.sharding.Mesh | None = None, param_shardings: Any = None,
               unstack_layers: bool | None = None):
    """`unstack_layers` (default: everywhere but TPU) keeps each decoder layer's and head block's weights in
    separate buffers for the token loop (`decode_layout.split_for_decode`); the stacked copy given is not kept."""
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    if (platform != "tpu" if unstack_layers is None else unstack_layers) and "unstacked_layers" not in params:
      params = decode_layout.split_for_decode(params)
    self.cfg, self.params, self.vae_cfg, self.vae_params = cfg, params, vae_cfg, vae_params
    self.tokenizer, self.mesh, self.param_shardings = tokenizer, mesh, param_shardings
    self._compiled: dict[tuple, Any] = {}
    self._progress = _TokenRelay()  # the programs' per-token hook (closed over by every program of this sampler)
    self.compile_count = 0

  @classmethod
  def from_checkpoint(cls, model_dir: str | Path, mesh: jax.sharding.Mesh | None = None,
                      compute_dtype: str | None = None, quantize: str | None = None) -> "Sampler":
    """Loads a model directory (`nextstep_config.json`, `params/`, `vae_params/`, `tokenizer/`). `quantize="int8"`
    samples with int8 dense kernels (`models/quant.py`): those stored by `convert --quantize int8`, else the float
    weights quantized on load."""
    model_dir = Path(model_dir)
    meta = params_io.read_model_config(model_dir)
    cfg = ModelConfig.from_dict(dict(meta["model"], **({"dtype": compute_dtype} if compute_dtype else {})))
    if quantize is not None and quantize not in quant.MODES:
      raise ValueError(f"quantize={quantize!r} is not one of {quant.MODES}; pass --quantize int8 or leave it out")
    stored = meta.get("quantization")
    abstract, names = abstract_params(cfg)
    float_names = names
    if stored:
      abstract, names = quant.quantized_abstract(abstract, names, stored.get("include_head", False))
    mesh = mesh or sharding.mesh_from_shape((1, 1, 1), jax.devices()[:1])
    shardings = sharding.tree_shardings(names, abstract, mesh)
    target = sharding.abstract_sharded(abstract, shardings)
    params = params_io.load_params(model_dir / "params", target)
    if quantize and not stored:
      params = quant.quantize_params(params)
      q_abstract, names = quant.quantized_abstract(abstract, float_names)
      shardings = sharding.tree_shardings(names, q_abstract, mesh)
      params = jax.device_put(params, shardings)
    vae_cfg = vae_params = None
    if "vae" in meta and (model_dir / "vae_params").is_dir():
      vae_cfg = VAEConfig.from_dict(meta["vae"])
      vae_params = params_io.load_params(model_dir / "vae_params")
    tokenizer = None
    if (model_dir / "tokenizer").is_dir():
      tokenizer = NextStepTokenizer(model_dir / "tokenizer").check_model_config(cfg)
    return cls(cfg, params, vae_cfg, vae_params, tokenizer, mesh, shardings)

  # ------------------------------------------------------------------------------------------- geometry

  def token_grid(self, height: int, width: int) -> tuple[int, int]:
    if self.vae_cfg is None:
      raise ValueError("this checkpoint has no VAE (vae_params/); convert one with `nextstep-jax convert vae`")
    return token_grid(height, width, self.vae_cfg.downsample_factor, self.cfg.latent_patch_size)

  def _check_length(self, prompt_len: int, n_tokens: int) -> None:
    if prompt_len + n_tokens > self.cfg.max_position_embeddings:
      raise ValueError(f"prompt of {prompt_len} tokens + {n_tokens} image tokens exceeds max_position_embeddings "
                       f"{self.cfg.max_position_embeddings}; use a smaller image or a shorter prompt")

  # ------------------------------------------------------------------------------------------- modes

  def text_to_image(self, prompts: str | Sequence[str], opts: Options = Options(),
                    noise_draws: np.ndarray | None = None) -> Result:
    opts = opts.validate()
    tok = self._need_tokenizer()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    gh, gw = self.token_grid(opts.height, opts.width)
    use_cfg = opts.cfg > 1
    rows = tok.t2i_cfg_rows(prompts, gh, gw, opts.num_images_per_prompt, opts.positive_prompt,
                            T2I_NEGATIVE if opts.negative_prompt is None else opts.negative_prompt, cfg=use_cfg)
    num_images = len(prompts) * opts.num_images_per_prompt
    noise_repeat = num_images if opts.independent_noise else opts.num_images_per_prompt
    return self._run(rows, src_rows=None, branches=2 if use_cfg else 1, num_images=num_images, grid=(gh, gw),
                     opts=opts, default_shift=1.0, noise_repeat=noise_repeat, noise_draws=noise_draws)

  def edit(self, caption: str, image_uint8: np.ndarray | None, opts: Options = Options(),
           noise_draws: np.ndarray | None = None) -> Result:
    """Editing: `caption` holds exactly one `<image>`; the source image is VAE-encoded into its placeholders."""
    opts = opts.validate()
    if image_uint8 is None:
      raise ValueError("editing needs a source image (--image in.png); for text-to-image drop the <image> tag")
    tok = self._need_tokenizer()
    image = np.asarray(image_uint8)
    sh, sw = self.token_grid(image.shape[0], image.shape[1])
    gh, gw = self.token_grid(opts.height, opts.width)
    use_cfg, use_img = opts.cfg > 1, opts.cfg_img > 1
    n_img = opts.num_images_per_prompt
    rows = tok.edit_cfg_rows(caption, sh, sw, gh, gw, EDIT_NEGATIVE if opts.negative_prompt is None else
                             opts.negative_prompt, n_img, cfg=use_cfg, image_cfg=use_img)
    branches = 1 + int(use_cfg) + int(use_cfg and use_img)
    pixels = jnp.asarray(image[None].astype(np.float32) / 127.5 - 1.0)
    src = patchify(encode_latents(self.vae_params, self.vae_cfg, pixels), self.cfg.latent_patch_size)
    src_rows = np.zeros((len(rows), src.shape[1], src.shape[2]), np.float32)
    with_image = n_img * (2 if branches == 3 else 1)  # cond (+ image-uncond) rows carry the source image
    src_rows[:with_image] = np.asarray(src[0])
    return self._run(rows, src_rows=src_rows, branches=branches, num_images=n_img, grid=(gh, gw), opts=opts,
                     default_shift=3.2, noise_repeat=n_img, noise_draws=noise_draws)

  # ------------------------------------------------------------------------------------------- program

  def _need_tokenizer(self):
    if self.tokenizer is None:
      raise ValueError("this checkpoint has no tokenizer/ directory; copy the tokenizer files into it")
    return self.tokenizer

  def _run(self, rows, *, src_rows, branches: int, num_images: int, grid: tuple[int, int], opts: Options,
           default_shift: float, noise_repeat: int, noise_draws) -> Result:
    gh, gw = grid
    # a bucket that would overflow the position table gives way to the longest length that fits
    self._check_length(max(map(len, rows), default=0), gh * gw)  # no rows: left_pad says so
    cap = self.cfg.max_position_embeddings - gh * gw
    buckets = sorted({min(b, cap) for b in opts.buckets})
    ids, mask = left_pad(rows, self.cfg.pad_token_id, buckets)
    check_grids_fit(self.cfg, [(gh, gw)], f"sample at most {self.cfg.base_image_grid_size} tokens per side")
    spec = Spec(num_images=num_images, branches=branches, prompt_len=ids.shape[1], grid_h=gh, grid_w=gw,
                flow=opts.flow_config(default_shift),
                src_tokens=0 if src_rows is None else src_rows.shape[1], noise_repeat=noise_repeat,
                use_norm=opts.use_norm, cfg_schedule=opts.cfg_schedule, decode=opts.decode and self.vae_cfg is not None,
                injected_noise=noise_draws is not None, progress=opts.progress,
                return_debug=noise_draws is not None if opts.return_debug is None else opts.return_debug)
    args = self._place(ids, mask, src_rows)
    key = jax.random.key(opts.seed)
    draws = None if noise_draws is None else jnp.asarray(noise_draws, jnp.float32)
    call_args = (self.params, self.vae_params, *args, jnp.float32(opts.cfg), jnp.float32(opts.cfg_img), key, draws)
    compile_s = 0.0
    with sharding.use_mesh(self.mesh):
      if spec not in self._compiled:
        t0 = time.perf_counter()
        program = compiled_program(self.cfg, self.vae_cfg, spec, self._progress if spec.progress else None)
        self._compiled[spec] = program.lower(*call_args).compile()
        compile_s = time.perf_counter() - t0
        self.compile_count += 1
      with _progress_bar(spec, self._progress):
        t0 = time.perf_counter()
        out = jax.block_until_ready(self._compiled[spec](*call_args))
        run_s = time.perf_counter() - t0
    out = jax.device_get(out)
    images = out.pop("images", None)
    out["prompt_ids"], out["prompt_mask"] = ids, mask
    return Result(images=images, tokens=out.pop("tokens"), compile_s=compile_s, run_s=run_s, extras=out)

  def _place(self, ids, mask, src_rows):
    """Row arrays onto the mesh (rows over the batch axes)."""
    arrays = [jnp.asarray(ids), jnp.asarray(mask), None if src_rows is None else jnp.asarray(src_rows)]
    if self.mesh is None or self.mesh.size == 1:
      return arrays
    placed = []
    for a in arrays:
      if a is None:
        placed.append(None)
        continue
      spec = sharding.logical_to_spec(("act_batch",) + (None,) * (a.ndim - 1), a.shape, self.mesh)
      placed.append(jax.device_put(a, jax.sharding.NamedSharding(self.mesh, spec)))
    return placed


class _TokenRelay:
  """The host hook a sampler's programs call per token; forwards to whatever `_progress_bar` installed."""

  def __init__(self):
    self.target: Callable[[int], None] | None = None

  def __call__(self, k: int) -> None:
    if self.target is not None:
      self.target(k)


class _progress_bar:
  """Points the sampler's token relay at a tqdm bar for one call (when the spec asks for progress)."""

  def __init__(self, spec: Spec, relay: _TokenRelay):
    self.spec, self.relay, self.bar = spec, relay, None

  def __enter__(self):
    if self.spec.progress:
      self.bar = tqdm(total=self.spec.num_tokens, desc="image tokens", unit="tok")
      self.relay.target = lambda k: self.bar.update(1)
    return self

  def __exit__(self, *exc):
    if self.bar is not None:
      self.relay.target = None
      self.bar.update(self.bar.total - self.bar.n)
      self.bar.close()
