"""`runtime.threads`: null | auto | N, applied before any stage and recorded in summary.json."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY_PLANTCLEF_RUN, compose_config
from vitlab.errors import ConfigError
from vitlab.pipelines.base import prepare_run
from vitlab.runtime import local_spark_master, resolve_threads


def test_auto_takes_the_cores_not_busy_at_start():
    assert resolve_threads("auto", cores=2, load_1min=0.2) == 2
    assert resolve_threads("auto", cores=2, load_1min=1.4) == 1
    assert resolve_threads("auto", cores=2, load_1min=14.0) == 1  # never 0
    assert resolve_threads("auto", cores=8, load_1min=2.6) == 5
    assert resolve_threads(None) is None and resolve_threads(3) == 3
    for bad in (0, -1, "many", 1.5, True):
        with pytest.raises(ConfigError, match="runtime.threads"):
            resolve_threads(bad)


def test_spark_local_master_follows_the_thread_count():
    assert local_spark_master("local[*]", 1) == "local[1]"
    assert local_spark_master("local[*]", None) == "local[*]"
    assert local_spark_master("spark://head:7077", 1) == "spark://head:7077"


def test_threads_are_applied_before_any_stage_and_recorded(tiny_plantclef, tmp_path):
    from vitlab.pipelines.plantclef import train

    before = torch.get_num_threads()
    try:
        cfg = compose_config(
            "train",
            [
                *TINY_PLANTCLEF_RUN,
                f"dataset.root={tiny_plantclef}",
                "runtime.threads=1",
                "engine=spark",
                "debug=fdr",
                "print_config=false",
                "logger=csv",
            ],
            tmp_path,
        )
        prepare_run(cfg)
        assert torch.get_num_threads() == 1
        assert cfg.engine.master == "local[1]"
        cfg.engine = compose_config("train", [], tmp_path).engine  # run it with the local engine
        train(cfg)
    finally:
        torch.set_num_threads(before)
    runtime = json.loads((tmp_path / "run" / "summary.json").read_text())["runtime"]
    assert runtime["threads_setting"] == 1 and runtime["torch_threads"] == 1
    assert runtime["cores"] >= 1 and len(runtime["load_average"]) == 3
    with pytest.raises(ConfigError, match="runtime.threads"):
        prepare_run(compose_config("train", ["runtime.threads=0"], tmp_path))


def test_the_thread_setting_caps_the_decode_pools():
    import torch

    from vitlab.runtime import apply_threads, decode_pool_size

    before = torch.get_num_threads()
    try:
        apply_threads(1)
        assert decode_pool_size() == 1 and torch.get_num_threads() == 1
        apply_threads(8)
        assert decode_pool_size() == 2  # never more than the pool's own size
    finally:
        apply_threads(None)
        torch.set_num_threads(before)
    assert decode_pool_size() == 2
