"""Aggregation strategies that turn per-tile predictions into plot-level species sets."""
