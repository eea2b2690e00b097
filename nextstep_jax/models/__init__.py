"""Linen modules: Qwen2 backbone, attention dispatch, flow-matching head, Flux VAE, NextStep model."""
