import json
import math
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import f1_score

from vitlab.errors import DatasetFormatError
from vitlab.metrics.__main__ import main
from vitlab.metrics.fungiclef import (
    accuracy,
    fungiclef_scores,
    macro_f1,
    poisonous_recall,
    read_fungiclef_csv,
    read_poison_list,
    track1,
    track2,
    track3,
    track4,
    write_fungiclef_submission,
)

KEYS = {"track1", "track2", "track3", "track4", "macro_f1", "accuracy", "poisonous_recall"}


def _random_case(rng: np.random.Generator):
    """Truth with unknowns, a poisonous subset, predictions that include -1 and unseen classes."""
    known = list(range(int(rng.integers(2, 12))))
    poisonous = {int(c) for c in known if rng.random() < 0.3}
    if rng.random() < 0.5:
        poisonous.add(500)  # a poisonous species nobody predicts or observes
    n = int(rng.integers(1, 60))
    ids = rng.choice(10**6, n, replace=False)
    truth, submission = {}, {}
    for obs in rng.permutation(ids):
        t = -1 if rng.random() < 0.25 else int(rng.choice(known))
        roll = rng.random()
        if roll < 0.4:
            p = t
        elif roll < 0.6:
            p = -1
        elif roll < 0.7:
            p = 1000 + int(rng.integers(0, 3))  # a class absent from the truth
        else:
            p = int(rng.choice(known))
        truth[int(obs)], submission[int(obs)] = t, p
    return truth, submission, poisonous


def _loop_reference(truth, submission, poisonous):
    """Straight per-observation transcription of the official definitions."""
    n = len(truth)
    t1 = t4 = psc = esc = correct = 0.0
    n_poison = caught = 0
    for obs, t in truth.items():
        p = submission[obs]
        if t != -1 and p != -1 and t != p:
            t1 += 1
            t4 += 1
        elif t == -1 and p != -1:
            t1 += 1
            t4 += 10
        elif t != -1 and p == -1:
            t1 += 1
            t4 += 0.1
        else:
            correct += 1
        t_poison, p_poison = t in poisonous and t != -1, p in poisonous and p != -1
        if t_poison and not p_poison:
            psc += 1
        if not t_poison and p_poison:
            esc += 1
        if t_poison:
            n_poison += 1
            caught += p_poison
    t2 = (100 * psc + esc) / n
    return {
        "track1": t1 / n,
        "track2": t2,
        "track3": t1 / n + t2,
        "track4": t4 / n,
        "accuracy": correct / n,
        "poisonous_recall": caught / n_poison if n_poison else None,
    }


def _arrays(truth, submission):
    ids = sorted(truth)
    return np.array([truth[i] for i in ids]), np.array([submission[i] for i in ids])


@pytest.mark.parametrize("seed", range(30))
def test_scores_match_independent_computation(seed):
    truth, submission, poisonous = _random_case(np.random.default_rng(seed))
    y_true, y_pred = _arrays(truth, submission)
    ref = _loop_reference(truth, submission, poisonous)
    labels = sorted(set(y_true) | set(y_pred))
    ref_f1 = 100 * f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0)

    # unrounded pure functions
    assert track1(y_true, y_pred) == pytest.approx(ref["track1"], abs=1e-12)
    assert track2(y_true, y_pred, poisonous) == pytest.approx(ref["track2"], abs=1e-12)
    assert track3(y_true, y_pred, poisonous) == pytest.approx(ref["track3"], abs=1e-12)
    assert track4(y_true, y_pred) == pytest.approx(ref["track4"], abs=1e-12)
    assert accuracy(y_true, y_pred) == pytest.approx(ref["accuracy"], abs=1e-12)
    assert macro_f1(y_true, y_pred) == pytest.approx(ref_f1, abs=1e-10)
    recall = poisonous_recall(y_true, y_pred, poisonous)
    if ref["poisonous_recall"] is None:
        assert math.isnan(recall)
    else:
        assert recall == pytest.approx(ref["poisonous_recall"], abs=1e-12)

    # the leaderboard dict: same values, rounded with np.round like the organisers
    scores = fungiclef_scores(truth, submission, poisonous)
    assert set(scores) == KEYS
    for key in ("track1", "track2", "track3", "track4"):
        assert scores[key] == pytest.approx(ref[key], abs=5e-5 + 1e-9), key
    assert scores["track3"] == np.round(
        track1(y_true, y_pred) + track2(y_true, y_pred, poisonous), 4
    )
    # macro F1 rounded in percent like the organisers, then reported as a fraction
    assert scores["macro_f1"] == round(np.round(macro_f1(y_true, y_pred), 2) / 100, 4)
    assert 100 * scores["macro_f1"] == pytest.approx(ref_f1, abs=5e-3 + 1e-9)
    assert scores["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert scores["poisonous_recall"] == pytest.approx(ref["poisonous_recall"], abs=1e-12)


# One observation of each kind; poisonous = {3}. Per obs: (truth, prediction, what it is).
HAND = [
    (1, 1, "correct"),
    (1, 2, "other error"),
    (-1, -1, "correct unknown"),
    (-1, 2, "unknown as known"),
    (2, -1, "known as unknown"),
    (3, 1, "other error + PSC"),
    (3, -1, "known as unknown + PSC"),
    (-1, 3, "unknown as known + ESC"),
    (1, 3, "other error + ESC"),
    (3, 3, "correct poisonous"),
]
HAND_TRUTH = {i + 1: t for i, (t, _, _) in enumerate(HAND)}
HAND_SUB = {i + 1: p for i, (_, p, _) in enumerate(HAND)}


def test_hand_computed_tracks():
    y_true, y_pred = _arrays(HAND_TRUTH, HAND_SUB)
    # 3 other errors, 2 unknown-as-known, 2 known-as-unknown; PSC 2, ESC 2; N = 10
    assert track1(y_true, y_pred) == pytest.approx(7 / 10)
    assert accuracy(y_true, y_pred) == pytest.approx(3 / 10)
    assert track2(y_true, y_pred, {3}) == pytest.approx((100 * 2 + 2) / 10)
    assert track3(y_true, y_pred, {3}) == pytest.approx(0.7 + 20.2)
    assert track4(y_true, y_pred) == pytest.approx((3 + 10 * 2 + 0.1 * 2) / 10)
    # poisonous truths: obs 6, 7, 10; only obs 10 flagged
    assert poisonous_recall(y_true, y_pred, {3}) == pytest.approx(1 / 3)
    # F1 per label: -1: 2·1/(3+3); 1: 2·1/(3+2); 2: 0; 3: 2·1/(3+3)
    assert macro_f1(y_true, y_pred) == pytest.approx(100 * (1 / 3 + 0.4 + 0 + 1 / 3) / 4)
    scores = fungiclef_scores(HAND_TRUTH, HAND_SUB, {3})
    assert scores == {
        "track1": 0.7,
        "track2": 20.2,
        "track3": 20.9,
        "track4": 2.32,
        "macro_f1": 0.2667,
        "accuracy": pytest.approx(0.3),
        "poisonous_recall": pytest.approx(1 / 3),
    }


def test_poison_edge_cases():
    y_true, y_pred = np.array([3, 7, 5]), np.array([4, 3, 3])
    # 3 -> 4: both poisonous, free in track 2; 7 absent from the list -> edible, so 7 -> 3 is
    # an ESC; 5 is edible -> 3 is an ESC
    assert track2(y_true, y_pred, {3, 4}) == pytest.approx(2 / 3)
    assert poisonous_recall(y_true, y_pred, {3, 4}) == 1.0
    # -1 is never poisonous, even if the caller says so
    assert track2(np.array([-1, 1]), np.array([1, -1]), {-1}) == 0.0
    assert track2(np.array([1]), np.array([-1]), np.array([1])) == 100.0
    # no poisonous truth: recall undefined -> NaN, None in the dict
    assert math.isnan(poisonous_recall(np.array([1]), np.array([1]), set()))
    assert fungiclef_scores({1: 1}, {1: 1}, set())["poisonous_recall"] is None


def test_perfect_and_all_unknown_predictions():
    truth = {1: 5, 2: -1, 3: 7}
    perfect = fungiclef_scores(truth, dict(truth), {7})
    assert perfect["track1"] == perfect["track2"] == perfect["track4"] == 0.0
    assert perfect["macro_f1"] == 1.0 and perfect["accuracy"] == 1.0
    unknown = fungiclef_scores(truth, {i: -1 for i in truth}, {7})
    assert unknown["track2"] == pytest.approx(round(100 / 3, 4))
    assert unknown["track4"] == pytest.approx(round(0.2 / 3, 4))


def test_submission_must_cover_the_truth_exactly():
    truth = {1: 1, 2: 2, 3: -1}
    with pytest.raises(DatasetFormatError, match=r"misses 1 observation.*\[3\]"):
        fungiclef_scores(truth, {1: 1, 2: 2}, set())
    with pytest.raises(DatasetFormatError, match=r"not in the truth.*\[9\]"):
        fungiclef_scores(truth, {1: 1, 2: 2, 3: -1, 9: 1}, set())
    with pytest.raises(DatasetFormatError, match="no observations"):
        fungiclef_scores({}, {}, set())


def test_submission_round_trip_and_format(tmp_path):
    path = write_fungiclef_submission({20: -1, 3: 1604, 7: 0}, tmp_path / "out" / "s.csv")
    assert path.read_text().splitlines() == ["observationID,class_id", "3,1604", "7,0", "20,-1"]
    assert read_fungiclef_csv(path) == {3: 1604, 7: 0, 20: -1}
    assert not list(path.parent.glob("*.tmp"))


def test_reader_accepts_extra_columns_and_bom(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text('\ufeffobservationID,locality,class_id\n5,"Aarhus, DK",12\n6,x,-1\n')
    assert read_fungiclef_csv(path) == {5: 12, 6: -1}


@pytest.mark.parametrize(
    "body, message",
    [
        ("observationID,species\n1,2\n", ":1: header must contain.*missing class_id"),
        ("", ":1: header.*missing observationID, class_id"),
        ("observationID,class_id\n1,2\n1,2\n", ":3: observationID 1 listed twice"),
        ("observationID,class_id\n1,2\n2,x\n", ":3: values must be integers"),
        ("observationID,class_id\n1,2.5\n", ":2: values must be integers"),
        ("observationID,class_id\n1,\n", ":2: values must be integers"),
        ("observationID,class_id\n1,2,3\n", ":2: expected 2 fields"),
    ],
)
def test_malformed_csv_fails_naming_file_and_line(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(DatasetFormatError, match="bad.csv" + message):
        read_fungiclef_csv(path)


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(DatasetFormatError, match="not found"):
        read_fungiclef_csv(tmp_path / "nope.csv")


def test_poison_list(tmp_path):
    path = tmp_path / "poison.csv"
    path.write_text("class_id,poisonous,species\n3,1,a\n3,1,a\n4,0,b\n-1,1,?\n9,1,c\n")
    assert read_poison_list(path) == {3, 9}
    path.write_text("class_id,poisonous\n3,1\n3,0\n")
    with pytest.raises(DatasetFormatError, match=":3: class_id 3 listed as both"):
        read_poison_list(path)
    path.write_text("class_id,poisonous\n3,2\n")
    with pytest.raises(DatasetFormatError, match=":2: poisonous must be 0 or 1"):
        read_poison_list(path)


def _files(tmp_path, truth, submission, poison_body="class_id,poisonous\n3,1\n1,0\n"):
    t = write_fungiclef_submission(truth, tmp_path / "truth.csv")
    s = write_fungiclef_submission(submission, tmp_path / "sub.csv")
    p = tmp_path / "poison.csv"
    p.write_text(poison_body)
    return ["fungiclef", "--truth", str(t), "--submission", str(s), "--poison", str(p)]


def test_cli_prints_json(tmp_path):
    argv = _files(tmp_path, HAND_TRUTH, HAND_SUB)
    out = subprocess.run(
        [sys.executable, "-m", "vitlab.metrics", *argv], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    scores = json.loads(out.stdout)
    assert set(scores) == KEYS
    assert scores == fungiclef_scores(HAND_TRUTH, HAND_SUB, {3})
    assert scores["track3"] == 20.9


def test_cli_malformed_truth_exit_code(tmp_path, capsys):
    argv = _files(tmp_path, HAND_TRUTH, HAND_SUB)
    (tmp_path / "truth.csv").write_text("observationID,class_id\n1,2\n1,3\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "truth.csv:3" in err and "listed twice" in err


def test_cli_bad_poison_list_exit_code(tmp_path, capsys):
    argv = _files(tmp_path, HAND_TRUTH, HAND_SUB, poison_body="class_id,toxic\n3,1\n")
    assert main(argv) == 2
    assert "poison.csv:1" in capsys.readouterr().err


def test_cli_incomplete_submission_exit_code(tmp_path):
    argv = _files(tmp_path, HAND_TRUTH, {k: v for k, v in HAND_SUB.items() if k != 4})
    out = subprocess.run(
        [sys.executable, "-m", "vitlab.metrics", *argv], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert out.stdout == ""
    assert "sub.csv" in out.stderr and "misses 1 observation" in out.stderr
