"""Observation metadata encoders for FungiCLEF heads.

- categorical (Substrate, MetaSubstrate, Habitat): one-hot over a vocabulary fitted on the
  training rows plus an "other" slot for values never seen in training; a missing value is all
  zeros (no evidence either way).
- date: month and day as sin/cos of 2π(m-1)/12 and 2π(d-1)/31; a missing value counts as 1 (the
  team's convention); a value outside 1..12 / 1..31 is refused, never aliased.
- location: the geohash of (Latitude, Longitude) at precision 5; the characters of levels 2..5
  (level 1 is the same for all of Denmark) mapped from base-32 to [0, 1); missing -> zeros.
Missing values are counted per column in `report`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

GEOHASH_ALPHABET = "0123456789bcdefghjkmnpqrstuvwxyz"
CATEGORICAL = ("Substrate", "MetaSubstrate", "Habitat")
DATE_PERIODS = {"month": 12, "day": 31}  # valid values 1..period; the cyclic encoding's period


def invalid_numbers(raw: pd.Series, low: float, high: float, integer: bool = False) -> pd.Series:
    """True where a value is given (not missing) but is not a finite number in [low, high]
    (an integer one when `integer`): "March", "13" for a month, "1.5" for an id."""
    values = pd.to_numeric(raw, errors="coerce")
    ok = values.between(low, high) & np.isfinite(values)
    if integer:
        ok &= values == values.round()
    return raw.notna() & ~ok


def geohash(lat: float, lon: float, precision: int = 5) -> str:
    """Standard geohash: interleaved longitude/latitude bisection bits, 5 bits per character."""
    lat_range, lon_range = [-90.0, 90.0], [-180.0, 180.0]
    chars, bits, value, even = [], 0, 0, True
    while len(chars) < precision:
        rng, x = (lon_range, lon) if even else (lat_range, lat)
        mid = (rng[0] + rng[1]) / 2
        value = value * 2 + (x >= mid)
        rng[0 if x >= mid else 1] = mid
        even, bits = not even, bits + 1
        if bits == 5:
            chars.append(GEOHASH_ALPHABET[value])
            bits, value = 0, 0
    return "".join(chars)


def geohash_levels(lat: float, lon: float, levels: tuple[int, ...] = (2, 3, 4, 5)) -> list[float]:
    code = geohash(lat, lon, max(levels))
    return [GEOHASH_ALPHABET.index(code[level - 1]) / 32 for level in levels]


def cyclic(value: float, period: int) -> tuple[float, float]:
    angle = 2 * math.pi * (value - 1) / period
    return math.sin(angle), math.cos(angle)


@dataclass
class MetadataEncoder:
    """Fit on training rows, then encode any split; `groups` names the column slices
    (date, geo, substrate) that the transformer head turns into tokens."""

    vocabularies: dict[str, list[str]] = field(default_factory=dict)

    def fit(self, frame: pd.DataFrame) -> MetadataEncoder:
        for column in CATEGORICAL:
            values = frame[column].dropna().astype(str) if column in frame else pd.Series([])
            self.vocabularies[column] = sorted(values.unique().tolist())
        return self

    @property
    def groups(self) -> dict[str, tuple[int, int]]:
        categorical = sum(len(v) + 1 for v in self.vocabularies.values())
        return {"date": (0, 4), "geo": (4, 8), "substrate": (8, 8 + categorical)}

    @property
    def dim(self) -> int:
        return self.groups["substrate"][1]

    def transform(self, frame: pd.DataFrame) -> tuple[np.ndarray, dict[str, int]]:
        """(rows, dim) float32 features and the count of missing values per column."""
        if not self.vocabularies:
            raise ValueError("MetadataEncoder.transform before fit")
        n = len(frame)
        out = np.zeros((n, self.dim), dtype=np.float32)
        missing: dict[str, int] = {}

        def column(name: str) -> pd.Series:
            series = frame[name] if name in frame else pd.Series([np.nan] * n, index=frame.index)
            missing[name] = int(series.isna().sum())
            return series

        for offset, (name, period) in enumerate(DATE_PERIODS.items()):
            raw = column(name)
            bad = invalid_numbers(raw, 1, period, integer=True)
            if bad.any():  # 13 would alias to 1 and "March" would read as missing
                raise ValueError(
                    f"{name} must be an integer 1-{period} or missing, got "
                    f"{raw[bad].iloc[0]!r} ({int(bad.sum())} row(s)); read CSVs with "
                    "vitlab.data.fungiclef.read_metadata, which names the line"
                )
            values = pd.to_numeric(raw, errors="coerce").fillna(1).to_numpy()
            angle = 2 * np.pi * (values - 1) / period
            out[:, 2 * offset], out[:, 2 * offset + 1] = np.sin(angle), np.cos(angle)
        lat = pd.to_numeric(column("Latitude"), errors="coerce").to_numpy()
        lon = pd.to_numeric(column("Longitude"), errors="coerce").to_numpy()
        for i in np.flatnonzero(~(np.isnan(lat) | np.isnan(lon))):
            out[i, 4:8] = geohash_levels(float(lat[i]), float(lon[i]))
        start = 8
        for name, vocab in self.vocabularies.items():
            index = {v: k for k, v in enumerate(vocab)}
            values = column(name)
            for i, value in enumerate(values.to_numpy()):
                if not pd.isna(value):
                    out[i, start + index.get(str(value), len(vocab))] = 1.0  # unseen -> other
            start += len(vocab) + 1
        return out, missing

    def state(self) -> dict[str, Any]:
        return {"vocabularies": self.vocabularies}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MetadataEncoder:
        return cls(vocabularies={k: list(v) for k, v in state["vocabularies"].items()})
