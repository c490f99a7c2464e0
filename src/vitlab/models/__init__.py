"""Backbones, feature reducers and heads."""
