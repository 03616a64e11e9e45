"""Benchmarks that print numbers; each file says how to run it."""
