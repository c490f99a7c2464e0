"""Metrics of the three lines of work; `python -m vitlab.metrics` scores files."""
