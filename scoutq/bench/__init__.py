"""Benchmarks that print figures (speed and memory targets are checked here, never in tests)."""
