"""The CPU demo: shapes data → VAE → latent cache → NextStep training → samples → evaluator → report.

Entry points: `nextstep-jax demo --workdir DIR` (nextstep_jax/commands/demo.py) and `run.run_demo(workdir)`.
"""
from nextstep_jax.paths import CONFIGS_DIR

DEFAULT_CONFIG = str(CONFIGS_DIR / "demo" / "stage1.py")
