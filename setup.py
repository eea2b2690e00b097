"""Install nextstep_jax: `pip install -e ".[test]"` (add `tpu` for TPU AOT compilation)."""
from setuptools import find_packages, setup

setup(
    name="nextstep_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of NextStep-1 (autoregressive image generation with continuous tokens).",
    packages=find_packages(include=["nextstep_jax", "nextstep_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax",
        "optax",
        "orbax-checkpoint",
        "grain",
        "tensorflow-datasets",
        "importlib_resources",
        "transformers>=5",
        "ml-collections",
        "einops",
        "numpy",
        "safetensors",
        "pillow",
        "tqdm",
        "braceexpand",
        "tensorboardX",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "diffusers", "webdataset", "braceexpand", "datasets",
                 "apache-beam"],
        # data at scale (nextstep_jax/data/wds.py, beam_build.py): official WebDataset shards, HF save_to_disk dirs,
        # Beam builds (apache-beam pins protobuf<7 / pillow<13 / pyarrow<26; it runs here with the newer ones)
        "data": ["braceexpand", "datasets", "pyarrow"],
        "beam": ["apache-beam"],
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["nextstep-jax=nextstep_jax.cli:main"]},
)
