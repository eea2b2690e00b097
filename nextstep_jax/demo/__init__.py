"""The CPU demo: shapes data → VAE → latent cache → NextStep training → samples → evaluator → report.

Entry points: `nextstep-jax demo --workdir DIR` (nextstep_jax/commands/demo.py) and `run.run_demo(workdir)`.
"""
