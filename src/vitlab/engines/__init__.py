"""Engines run a stage's per-shard task over the shards still to do: in-process (default) or
on Spark. A task is a picklable callable `task(shard_no, rows, progress) -> (table, report)`
where `rows` is the pandas frame of that shard's input rows (column `shard` + payload)."""

from vitlab.engines.local import LocalEngine
from vitlab.engines.spark import SparkEngine

ENGINES = ("local", "spark")


def create_engine(kind: str = "local", **kwargs):
    """`engine=local` or `engine=spark` (kwargs: master, app_name, conf)."""
    if kind == "local":
        return LocalEngine(**kwargs)
    if kind == "spark":
        return SparkEngine(**kwargs)
    raise ValueError(f"engine.kind={kind!r} is not one of {list(ENGINES)}")


__all__ = ["ENGINES", "LocalEngine", "SparkEngine", "create_engine"]
