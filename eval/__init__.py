"""Metrics, benchmarks and the evaluation CLI."""
