"""Optuna sweeps: `python sweep.py sweep=<name> [experiment=...] [key=value ...]`.

Runs trials of the experiment's pipeline until the study holds `sweep.n_trials` finished trials
(see `vitlab.sweep_driver`); `best_params.json` and `param_importance.png` land in
`<paths.root_dir>/sweeps/<study_name>/`. SIGTERM closes the running trial as failed (the next
`sweep.py` on the study re-runs it) and exits 143.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from vitlab.errors import USER_ERRORS
from vitlab.signals import Terminated, sigterm_as_exception
from vitlab.sweep_driver import next_step, run_one_trial, run_sweep

__all__ = ["next_step", "run_one_trial", "run_sweep"]
log = logging.getLogger("vitlab.sweep")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    try:
        with sigterm_as_exception():
            run_sweep(sys.argv[1:], CONFIG_DIR)
    except USER_ERRORS as err:
        log.error("%s: %s", type(err).__name__, err)
        return 2
    except Terminated as err:  # a scheduler's kill: not a success (exit 0) for whoever waits
        log.error("sweep stopped: %s", err)
        return int(err.code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
