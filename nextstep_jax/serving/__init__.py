"""Continuous-batching generation engine and its OpenAI-compatible HTTP server."""
