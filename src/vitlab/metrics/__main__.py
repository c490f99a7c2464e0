"""Score submission files: `python -m vitlab.metrics plantclef --truth T.csv --submission S.csv`,
or `python -m vitlab.metrics fungiclef --truth T.csv --submission S.csv --poison P.csv`.

Prints one JSON object. Exit code 2 with a message naming the file and line on malformed input.
"""

from __future__ import annotations

import argparse
import json
import sys

from vitlab.data.plantclef import DatasetFormatError, read_submission
from vitlab.metrics.fungiclef import fungiclef_scores, read_fungiclef_csv, read_poison_list
from vitlab.metrics.plantclef import plantclef_scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitlab.metrics")
    sub = parser.add_subparsers(dest="task", required=True)
    plant = sub.add_parser("plantclef", help="PlantCLEF 2024 F1 scores (fractions in [0,1])")
    plant.add_argument("--truth", required=True)
    plant.add_argument("--submission", required=True)
    fungi = sub.add_parser("fungiclef", help="FungiCLEF 2024 tracks 1-4, macro F1, accuracy")
    fungi.add_argument("--truth", required=True, help="CSV observationID,class_id")
    fungi.add_argument("--submission", required=True, help="CSV observationID,class_id")
    fungi.add_argument("--poison", required=True, help="CSV class_id,poisonous (0/1)")
    args = parser.parse_args(argv)
    if args.task == "fungiclef":
        return _fungiclef(args)
    try:
        truth = read_submission(args.truth)
        submission = read_submission(args.submission)
        scores = plantclef_scores(truth, submission)
    except DatasetFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    missing = sorted(set(truth) - set(submission))
    if missing:
        print(
            f"warning: {len(missing)} plot(s) missing from the submission scored 0, "
            f"e.g. {missing[:3]}",
            file=sys.stderr,
        )
    print(json.dumps(scores))
    return 0


def _fungiclef(args: argparse.Namespace) -> int:
    try:
        truth = read_fungiclef_csv(args.truth)
        submission = read_fungiclef_csv(args.submission)
        poisonous = read_poison_list(args.poison)
    except DatasetFormatError as err:  # the message already names file and line
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        scores = fungiclef_scores(truth, submission, poisonous)
    except DatasetFormatError as err:  # coverage mismatch: name the files compared
        print(f"error: {args.submission} vs {args.truth}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
