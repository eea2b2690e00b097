"""Evaluation: shapes mini-GenEval scorer, Fréchet/KID math, GenEval / DPG-Bench exporters."""
