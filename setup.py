"""Install nextstep_jax: `pip install -e ".[test]"` (add `tpu` for TPU AOT compilation)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', (Path(__file__).parent / "nextstep_jax" / "__init__.py").read_text())[1]

setup(
    name="nextstep_jax",
    version=VERSION,
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
        "fastapi",  # `nextstep-jax serve`
        "uvicorn",
        "python-multipart",
        "prometheus_client",
    ],
    extras_require={
        "test": ["pytest<9.2", "pytest-xdist",  # pytest 9.2 breaks xdist 3.8's --dist loadgroup (tests/conftest.py)
                  "torch==2.13.0", "diffusers", "openai", "httpx", "webdataset", "datasets"],
        # `data build --kind hf` (datasets.load_from_disk) and img2dataset parquet shards (pyarrow)
        "data": ["datasets", "pyarrow"],
        # `data build --kind wds --workers W` (Beam through TFDS). apache-beam pins pillow<13 / protobuf<7 /
        # pyarrow<26, older than constraints.txt: install it in its own environment with constraints-beam.txt
        # (.ci/run does; pytest marker `beam`)
        "beam": ["apache-beam"],
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["nextstep-jax=nextstep_jax.cli:main"]},
)
