"""The pipeline's stages: prepare -> embed -> fit -> predict -> score (see DESIGN.md)."""
