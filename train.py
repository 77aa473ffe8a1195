"""Train one configuration, or a sweep with -m. See README.md and `python train.py --help`."""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from regdrop.cli import help_text, jobs_started, run
from regdrop.identity import register_resolvers

# Run folders and data live under the project root, wherever train.py is called from.
os.environ.setdefault("REGDROP_ROOT", str(Path(__file__).resolve().parent))
register_resolvers()  # ${regdrop_run:} and ${regdrop_sweep:}: run folders named by the config


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(help_text())  # regdrop's own help; Hydra's is --hydra-help
        sys.exit(0)
    multirun, show = {"-m", "--multirun"}, {"-c", "--cfg"}
    if multirun & set(sys.argv) and show & set(sys.argv):
        # Hydra 1.3 refuses -m with --cfg; hydra.mode=MULTIRUN prints what a sweep's job gets.
        sys.argv = [sys.argv[0], "hydra.mode=MULTIRUN", *(a for a in sys.argv[1:] if a not in multirun)]
    try:
        main()
    except SystemExit as stop:
        # Hydra's own errors (an unknown key or group option on the command line) end with
        # status 1 before any job starts; they are bad input, like regdrop's: status 2.
        if stop.code == 1 and not jobs_started():
            sys.exit(2)
        raise
