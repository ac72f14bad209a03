"""Benchmarks: our implementation against a reference, measured side by side in one run."""
