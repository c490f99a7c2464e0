"""Run faults of issue 23: W&B online without a network falls back to offline within seconds, a
full disk fails the run naming the path (and `summary.json` never stays `running`), and a reused
run folder sets the earlier run's results aside instead of leaving them beside a new summary."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import vitlab.pipelines.plantclef.pipeline as plantclef_module
import vitlab.tracking as tracking
from tests.test_pipeline import _train_cfg
from vitlab.atomic import atomic_output
from vitlab.errors import ConfigError
from vitlab.pipelines.base import StageTimer
from vitlab.pipelines.plantclef import train
from vitlab.tracking import RunTracker, recorded_run, write_json

CSV_ONLY = OmegaConf.create({"wandb": None})
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no file name


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _tracker(run_dir: Path, logger=CSV_ONLY) -> RunTracker:
    return RunTracker(logger, run_dir, "train", OmegaConf.create({"a": 1}))


# ---------------------------------------------------------------------------------------------
# W&B online, no network


@pytest.fixture(params=["refused", "silent"])
def unreachable_wandb(request, tmp_path, monkeypatch) -> str:
    """W&B's API at a local port that refuses connections (bound, not listening) or accepts them
    and never answers (listening, never read): no real network, deterministic. W&B's own
    folders and credentials are the test's (a dummy key: the run must try the server)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    if request.param == "silent":
        server.listen(64)  # the kernel completes the handshakes; nobody ever reads or answers
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    home = tmp_path / "wandb-home"
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(home / key.lower()))
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "WANDB_INIT_TIMEOUT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the tracker sets it; monkeypatch restores it
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield url
    server.close()


def _online(init_timeout: float):
    return OmegaConf.create(
        {
            "wandb": {
                "mode": "online",
                "project": "p",
                "group": None,
                "tags": [],
                "name": None,
                "init_timeout": init_timeout,
            }
        }
    )


def test_wandb_online_without_network_falls_back_to_offline(unreachable_wandb, tmp_path, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vitlab.tracking"):
        tracker = _tracker(run_dir, _online(init_timeout=2))
    elapsed = time.monotonic() - start
    # 2 s init_timeout + W&B's 5 s grace at most + the offline start (under a second alone)
    assert elapsed < 12, f"{elapsed:.1f} s to fall back"
    assert tracker.wandb is not None and tracker.wandb.experiment.settings.mode == "offline"
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "offline" in warning and f"wandb sync {offline[0]}" in warning, warning
    assert "logger.wandb.init_timeout" in warning, warning
    summary: dict = {}
    with recorded_run(run_dir, summary, StageTimer(), tracker):  # the run goes on
        tracker.log_metrics({"val/f1": 0.5})
    on_disk = _summary(run_dir)
    assert on_disk["status"] == "completed"
    assert on_disk["wandb"]["mode"] == "offline"
    assert on_disk["wandb"]["sync"] == f"wandb sync {offline[0]}"


def test_wandb_init_timeout_is_checked(tmp_path):
    cfg = _online(init_timeout=0)
    with pytest.raises(ConfigError, match="logger.wandb.init_timeout"):
        _tracker(tmp_path, cfg)
    cfg.wandb.init_timeout = "soon"
    with pytest.raises(ConfigError, match="logger.wandb.init_timeout"):
        _tracker(tmp_path, cfg)


def test_wandb_config_sets_a_short_init_timeout(monkeypatch):
    node = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs/logger/wandb.yaml")
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    assert 5 <= float(node.wandb.init_timeout) <= 30  # seconds, not W&B's 90


# ---------------------------------------------------------------------------------------------
# a full disk


def _full_for(monkeypatch, *names: str) -> None:
    """The disk is full for the atomic writes of files named `names` (others are written)."""
    real = tracking.atomic_write_text

    def write(path, text):
        if Path(path).name in names:
            raise OSError(ENOSPC.errno, ENOSPC.strerror)
        real(path, text)

    monkeypatch.setattr(tracking, "atomic_write_text", write)


def test_disk_full_fails_the_run_naming_the_path(tmp_path, monkeypatch):
    _full_for(monkeypatch, "scores.json")
    scores = tmp_path / "scores.json"
    with (
        pytest.raises(OSError) as caught,
        recorded_run(tmp_path, {}, StageTimer(), _tracker(tmp_path)),
    ):
        write_json(scores, {"f1": 1.0})
    assert caught.value.errno == errno.ENOSPC
    assert type(caught.value).__name__ == "OutOfSpaceError"
    assert str(scores) in str(caught.value)
    on_disk = _summary(tmp_path)
    assert on_disk["status"] == "failed"
    assert on_disk["error"].startswith("OutOfSpaceError") and str(scores) in on_disk["error"]
    assert not scores.exists()


def test_disk_full_elsewhere_names_the_run_folder(tmp_path):
    """ENOSPC from a writer that does not say which file (a bare write()): the run folder."""
    with (
        pytest.raises(OSError) as caught,
        recorded_run(tmp_path, {}, StageTimer(), _tracker(tmp_path)),
    ):
        raise OSError(ENOSPC.errno, ENOSPC.strerror)
    assert type(caught.value).__name__ == "OutOfSpaceError"
    assert str(tmp_path) in str(caught.value)
    assert _summary(tmp_path)["status"] == "failed"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_atomic_output_names_the_path_it_could_not_write(tmp_path, code):
    path = tmp_path / "chart.png"
    with pytest.raises(OSError) as caught, atomic_output(path) as tmp:
        tmp.write_bytes(b"half a png")
        raise OSError(code, os.strerror(code))  # the writer's write() failed
    assert caught.value.errno == code and str(path) in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


def test_table_on_a_full_disk_names_its_path(tmp_path, monkeypatch):
    tracker = _tracker(tmp_path)
    real_open = open

    def full_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if "w" in mode and Path(file).name.startswith(".per_plot"):
            handle.close()
            raise OSError(ENOSPC.errno, ENOSPC.strerror)
        return handle

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(OSError) as caught:
        tracker.log_table("per_plot_predictions", ["plot_id"], [["a"]])
    monkeypatch.undo()
    assert str(tmp_path / "per_plot_predictions.csv") in str(caught.value)
    assert not list(tmp_path.glob("*per_plot*"))  # neither a half table nor its temp file


class _Tracker:
    """A tracker that only records how the run finished."""

    def __init__(self):
        self.finished: list[bool] = []

    def finish(self, failed: bool = False) -> None:
        self.finished.append(failed)


def test_summary_that_cannot_be_replaced_is_rewritten_in_place(tmp_path, monkeypatch):
    """The temp file of the final summary cannot be written (disk full): the summary is
    rewritten in place, so it says `failed`, not `running`, and the run's own error is kept."""
    tracker = _Tracker()
    with pytest.raises(RuntimeError, match="predict exploded"):
        with recorded_run(tmp_path, {"task": "train"}, StageTimer(), tracker):
            assert _summary(tmp_path)["status"] == "running"
            _full_for(monkeypatch, "summary.json")
            raise RuntimeError("predict exploded")
    on_disk = _summary(tmp_path)
    assert on_disk["status"] == "failed" and on_disk["error"] == "RuntimeError: predict exploded"
    assert tracker.finished == [True]
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left


def test_completed_run_whose_summary_cannot_be_written_fails(tmp_path, monkeypatch):
    tracker = _Tracker()
    summary_path = tmp_path / "summary.json"
    with pytest.raises(OSError) as caught:
        with recorded_run(tmp_path, {"task": "train"}, StageTimer(), tracker):
            _full_for(monkeypatch, "summary.json")
    assert caught.value.errno == errno.ENOSPC and str(summary_path) in str(caught.value)
    on_disk = _summary(tmp_path)
    assert on_disk["status"] == "failed" and str(summary_path) in on_disk["error"]
    assert tracker.finished == [True]


def test_summary_that_cannot_be_written_at_all_is_logged(tmp_path, monkeypatch, caplog):
    """Not even in place: an error names the file; the run's own error still propagates."""
    tracker = _Tracker()
    with pytest.raises(RuntimeError, match="predict exploded"):
        with recorded_run(tmp_path, {"task": "train"}, StageTimer(), tracker):
            _full_for(monkeypatch, "summary.json")

            def unwritable(path, text):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

            monkeypatch.setattr(tracking, "rewrite_in_place", unwritable)
            raise RuntimeError("predict exploded")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(str(tmp_path / "summary.json") in e and "running" in e for e in errors), errors
    assert tracker.finished == [True]


# ---------------------------------------------------------------------------------------------
# a reused run folder


def _earlier_run(run_dir: Path, **summary) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", **summary}))
    (run_dir / "submission.csv").write_text("plot_id;species_ids\nold;[1]\n")
    (run_dir / "scores.json").write_text('{"macro_f1": 0.9}')
    (run_dir / "predictions").mkdir()
    (run_dir / "predictions" / "a.png").write_bytes(b"old mask")
    (run_dir / "notes.txt").write_text("the user's own notes")
    (run_dir / "submission_v2.csv").write_text("the user's own edit")


def _fails_early(run_dir: Path) -> None:
    with pytest.raises(ConfigError), recorded_run(run_dir, {}, StageTimer(), _tracker(run_dir)):
        raise ConfigError("dataset.root: no species left")


def _moved(run_dir: Path, name: str) -> list[Path]:
    return sorted(run_dir.glob(f"{name}.previous-*"))


@pytest.mark.parametrize("listed", [True, False], ids=["listed", "earlier-vitlab"])
def test_reused_run_folder_sets_earlier_results_aside(tmp_path, listed):
    """`result_files` in the earlier summary says what to set aside; a summary from before that
    list existed: the names vitlab writes. A user's files stay where they are."""
    run_dir = tmp_path / "run"
    names = ["submission.csv", "scores.json", "predictions"]
    _earlier_run(run_dir, **({"result_files": names} if listed else {}))
    _fails_early(run_dir)
    assert _summary(run_dir)["status"] == "failed"
    for name in names:
        assert not (run_dir / name).exists(), name
        assert len(_moved(run_dir, name)) == 1, name
    assert _moved(run_dir, "submission.csv")[0].read_text() == "plot_id;species_ids\nold;[1]\n"
    assert (_moved(run_dir, "predictions")[0] / "a.png").read_bytes() == b"old mask"
    earlier = _moved(run_dir, "summary.json")  # kept beside the results it describes
    assert len(earlier) == 1 and json.loads(earlier[0].read_text())["status"] == "completed"
    assert (run_dir / "notes.txt").read_text() == "the user's own notes"
    assert (run_dir / "submission_v2.csv").read_text() == "the user's own edit"


def test_result_files_listed_are_the_only_ones_set_aside(tmp_path):
    """A listed summary is the record: a name it does not list (there before the run: the
    user's) stays, and a listed name outside the run folder is never followed."""
    run_dir = tmp_path / "run"
    _earlier_run(run_dir, result_files=["submission.csv", "../outside.txt", "/etc/hostname"])
    (tmp_path / "outside.txt").write_text("not the run's")
    _fails_early(run_dir)
    assert len(_moved(run_dir, "submission.csv")) == 1
    assert (run_dir / "scores.json").exists() and (run_dir / "predictions").is_dir()
    assert (tmp_path / "outside.txt").read_text() == "not the run's"
    assert not list(tmp_path.glob("outside.txt.previous-*"))


def test_folder_without_a_vitlab_summary_is_left_alone(tmp_path):
    run_dir = tmp_path / "mine"
    _earlier_run(run_dir)
    (run_dir / "summary.json").unlink()  # not a vitlab run folder: the user's files
    before = {p.name for p in run_dir.iterdir()}
    _fails_early(run_dir)
    after = {p.name for p in run_dir.iterdir()}
    assert before <= after and not [name for name in after if ".previous-" in name]
    assert (run_dir / "submission.csv").read_text() == "plot_id;species_ids\nold;[1]\n"


def test_run_records_its_result_files(tmp_path):
    tracker = _tracker(tmp_path)
    with recorded_run(tmp_path, {}, StageTimer(), tracker):
        write_json(tmp_path / "scores.json", {"f1": 1.0})
        tracker.log_table("held_out_scores", ["model", "f1"], [["ensemble", 1.0]])
        tracker.log_table("my_new_table", ["a"], [[1]])  # a table no list names yet
    assert _summary(tmp_path)["result_files"] == [
        "held_out_scores.csv",
        "my_new_table.csv",
        "scores.json",
    ]


def test_rerun_of_a_pipeline_into_its_folder_that_fails(tiny_plantclef, tmp_path, monkeypatch):
    """`hydra.run.dir=X` twice: the second run fails before predicting; the first run's
    submission and scores are no longer beside the new `failed` summary."""
    cfg = _train_cfg(tmp_path, tiny_plantclef, "trainer.max_epochs=2")
    first = train(cfg)
    run_dir = tmp_path / "run"
    assert first["status"] == "completed" and (run_dir / "submission.csv").is_file()
    recorded = _summary(run_dir)["result_files"]
    assert {"submission.csv", "scores.json", "per_species_f1.png"} <= set(recorded)
    (run_dir / "notes.txt").write_text("the user's own notes")

    def broken_fit(*args, **kwargs):
        raise RuntimeError("fit exploded")

    monkeypatch.setattr(plantclef_module, "_fit", broken_fit)
    with pytest.raises(RuntimeError, match="fit exploded"):
        train(_train_cfg(tmp_path, tiny_plantclef, "trainer.max_epochs=2"))
    assert _summary(run_dir)["status"] == "failed"
    for name in recorded:
        assert not (run_dir / name).exists() and len(_moved(run_dir, name)) == 1, name
    assert (run_dir / "notes.txt").read_text() == "the user's own notes"
