"""The benchmarks: each driver runs from the repository root as `python -m benchmarks.<driver>` (benchmarks/README.md)."""
