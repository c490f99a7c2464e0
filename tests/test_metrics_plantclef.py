import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score
from sklearn.preprocessing import MultiLabelBinarizer

from vitlab.data.plantclef import read_submission, write_submission
from vitlab.errors import DatasetFormatError
from vitlab.metrics.plantclef import plantclef_scores


def _random_case(rng: np.random.Generator):
    species = list(range(1000, 1000 + int(rng.integers(4, 15))))
    truth, submission = {}, {}
    for p in range(int(rng.integers(1, 12))):
        truth[f"plot{p}"] = set(rng.choice(species, int(rng.integers(1, 5)), replace=False))
        roll = rng.random()
        if roll < 0.1:
            continue  # missing plot: scored as an empty prediction
        if roll < 0.2:
            submission[f"plot{p}"] = set()  # empty prediction
        else:
            # may include species never seen in truth (unseen species)
            pool = species + [9000 + int(x) for x in set(rng.integers(0, 3, 2))]
            size = min(len(pool), int(rng.integers(1, 6)))
            submission[f"plot{p}"] = set(rng.choice(pool, size, replace=False))
    return truth, submission


def _sklearn_scores(truth, submission):
    plots = sorted(truth)
    y_true = [sorted(truth[p]) for p in plots]
    y_pred = [sorted(submission.get(p, set())) for p in plots]
    labels = sorted(set().union(*truth.values(), *submission.values()))
    mlb = MultiLabelBinarizer(classes=labels).fit([labels])
    t, p = mlb.transform(y_true), mlb.transform(y_pred)
    return {
        "macro_f1_per_plot": f1_score(t, p, average="samples", zero_division=0),
        "macro_f1_per_species": f1_score(t, p, average="macro", zero_division=0),
        "micro_f1": f1_score(t, p, average="micro", zero_division=0),
        "micro_precision": precision_score(t, p, average="micro", zero_division=0),
        "micro_recall": recall_score(t, p, average="micro", zero_division=0),
    }


@pytest.mark.parametrize("seed", range(40))
def test_scores_match_sklearn(seed):
    truth, submission = _random_case(np.random.default_rng(seed))
    ours = plantclef_scores(truth, submission)
    ref = _sklearn_scores(truth, submission)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


def test_hand_computed_case():
    truth = {"a": [1, 2], "b": [3]}
    submission = {"a": [1, 4], "b": []}
    scores = plantclef_scores(truth, submission)
    assert scores["macro_f1_per_plot"] == pytest.approx((0.5 + 0.0) / 2)
    # species 1: F1 1; 2: 0; 3: 0; 4: 0 (only predicted)
    assert scores["macro_f1_per_species"] == pytest.approx(0.25)
    assert scores["micro_f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 2))


def test_plots_not_in_truth_are_an_error():
    with pytest.raises(DatasetFormatError, match="not in the ground truth"):
        plantclef_scores({"a": [1]}, {"a": [1], "zzz": [2]})


def test_submission_round_trip_and_format(tmp_path):
    path = write_submission({"p2": [5], "p1": [1395807, 1351484], "p3": []}, tmp_path / "s.csv")
    text = path.read_text().splitlines()
    assert text == ["plot_id;species_ids", "p1;[1395807, 1351484]", "p2;[5]", "p3;[]"]
    assert read_submission(path) == {"p1": [1395807, 1351484], "p2": [5], "p3": []}


@pytest.mark.parametrize(
    "body, message",
    [
        ("plot;species\na;[1]\n", "header"),
        ("plot_id;species_ids\na;1, 2\n", ":2: species_ids must look like"),
        ("plot_id;species_ids\na;[1]\na;[2]\n", "listed twice"),
        ("plot_id;species_ids\na;[x]\n", ":2:"),
        ("plot_id;species_ids\na;[1];extra\n", "expected 2 fields"),
    ],
)
def test_malformed_submissions_fail_naming_the_line(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(DatasetFormatError, match=message.replace("[", r"\[")):
        read_submission(path)


def _score_files(truth, submission) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vitlab.metrics", "plantclef"]
    cmd += ["--truth", str(truth), "--submission", str(submission)]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_cli_prints_json_and_warns_about_missing_plots(tmp_path):
    truth = write_submission({"a": [1, 2], "b": [3]}, tmp_path / "t.csv")
    out = _score_files(truth, write_submission({"a": [1, 2]}, tmp_path / "s.csv"))
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout)
    assert set(scores) == {
        "macro_f1_per_plot",
        "macro_f1_per_species",
        "micro_f1",
        "micro_precision",
        "micro_recall",
    }
    assert scores["macro_f1_per_plot"] == pytest.approx(0.5)
    assert "missing from the submission" in out.stderr


def test_cli_malformed_exit_code(tmp_path):
    truth = write_submission({"a": [1]}, tmp_path / "t.csv")
    bad = tmp_path / "s.csv"
    bad.write_text("nope\n")
    out = _score_files(truth, bad)
    assert out.returncode == 2
    assert "s.csv" in out.stderr and "header" in out.stderr
