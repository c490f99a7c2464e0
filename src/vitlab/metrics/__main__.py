"""Score submission files: `python -m vitlab.metrics plantclef --truth T.csv --submission S.csv`.

Prints one JSON object. Exit code 2 with a message naming the file and line on malformed input.
"""

from __future__ import annotations

import argparse
import json
import sys

from vitlab.data.plantclef import DatasetFormatError, read_submission
from vitlab.metrics.plantclef import plantclef_scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitlab.metrics")
    sub = parser.add_subparsers(dest="task", required=True)
    plant = sub.add_parser("plantclef", help="PlantCLEF 2024 F1 scores (fractions in [0,1])")
    plant.add_argument("--truth", required=True)
    plant.add_argument("--submission", required=True)
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
