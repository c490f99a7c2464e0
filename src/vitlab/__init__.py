"""vitlab: transfer learning with self-supervised vision transformers."""

__version__ = "0.1.0"
