"""Synthetic datasets written in the official layouts, so the real code paths run on them.

`python -m vitlab.data.synthetic plantclef OUT_DIR [--seed N]`
"""

from vitlab.data.synthetic.plantclef import PlantClefSyntheticSpec, generate_plantclef

__all__ = ["PlantClefSyntheticSpec", "generate_plantclef"]
