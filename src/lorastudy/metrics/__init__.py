"""Evaluation modules loaded with `evaluate.load(<directory>)`, pinned with the package."""
