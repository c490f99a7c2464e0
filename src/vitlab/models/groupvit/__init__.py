"""GroupViT: the model, its text pipeline and checkpoint conversion."""
