"""Sampling: flow head samplers, CFG, the jitted generate program."""
