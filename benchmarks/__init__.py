"""The benchmarks: each script runs from the repository root as `python -m benchmarks.NAME`; `python -m benchmarks` runs the suite."""
