"""CLI command modules; each exposes `register(subparsers)` (see nextstep_jax/cli.py)."""
