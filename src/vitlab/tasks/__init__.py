"""LightningModules: thin wiring of heads, losses and metrics."""
