"""What `train.py`'s Hydra entry point runs: `regdrop.train.train`, with errors reported plainly,
and regdrop's own ``--help``.

A bad config value stops the run with one paragraph naming the key and what is valid (exit
status 2), never a traceback. In a multirun the failing job is marked failed and the other
jobs go on; when the sweep ends Hydra reports the failed job and exits 1.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from regdrop.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("data", "model", "dropout", "schedule", "optim", "lr", "trainer", "logger", "experiment",
          "hparams_search", "diagnostics")


def run(cfg: DictConfig) -> float | None:
    """Train ``cfg``; return the metric sweepers optimise (``optimized_metric``)."""
    from regdrop.train import train  # imported here so `--help` and `--cfg` stay fast

    try:
        metrics = train(cfg)
    except ConfigError as err:
        print(textwrap.fill(f"regdrop: error in {err}", width=100), file=sys.stderr)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(2)
    return metrics[cfg.optimized_metric]  # validate() made sure the run returns it


def help_text(conf: Path = CONF) -> str:
    """``python train.py --help``: the groups, each option with the first line of its file."""
    lines = [
        "regdrop: experiments with dropout-family regularization (Hydra + PyTorch).",
        "",
        "usage: python train.py [GROUP=OPTION ...] [KEY=VALUE ...]",
        "       python train.py -m GROUP=A,B KEY=1,2     (a sweep: one job per combination)",
        "       python train.py --cfg job [...]          (print the composed config)",
        "       python -m regdrop.report DIR             (a table from a multirun folder)",
        "",
        "Config groups (conf/<group>/<option>.yaml); defaults marked *:",
    ]
    defaults = _defaults(conf / "train.yaml")
    for group in GROUPS:
        folder = conf / group
        if not folder.is_dir():
            continue
        lines.append(f"  {group}:")
        for path in sorted(folder.glob("*.yaml")):
            mark = "*" if defaults.get(group) == path.stem else " "
            lines.append(f"   {mark}{path.stem:<34} {_first_comment(path)}".rstrip())
    lines += [
        "",
        "Any key can be set: e.g. dropout.p=0.3 trainer.epochs=10 seed=1 (see --cfg job).",
        "Full guide: README.md; methods: docs/methods.md; schedules: docs/schedules.md.",
        "Hydra's own flags: python train.py --hydra-help",
    ]
    return "\n".join(lines)


def _defaults(primary: Path) -> dict[str, str]:
    from omegaconf import OmegaConf

    chosen = {}
    for entry in OmegaConf.load(primary).defaults:
        if not isinstance(entry, str):
            for key, value in entry.items():
                chosen[str(key).removeprefix("optional ")] = value
    return chosen


def _first_comment(path: Path) -> str:
    """The first comment line of a config file that says what the option is."""
    for line in path.read_text().splitlines():
        text = line.lstrip("# ").strip()
        if line.startswith("#") and text and not text.startswith("@package"):
            sentence = text.split(". ")[0].split(": ")[0] if len(text) > 60 else text
            return sentence[:60] + ("..." if len(sentence) > 60 else "")
    return ""
