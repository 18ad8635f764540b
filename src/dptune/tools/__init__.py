"""Command-line tools (evaluate, predict, inspect, benchmark); ``scripts/`` are thin wrappers."""
