"""The report in wandb: ``python -m regdrop.report DIR --wandb``.

Logs what ``report.md`` shows into one wandb run of the sweep's group (``job_type:
report``), beside the sweep's runs: the table in the paper's layout as a ``wandb.Table``
(``report/table``: the rows and cells of report.md's table, mean ± std and n per cell), the
claims when the report has them (``report/claims``; else the claims the experiment declares)
and every figure (``report/figures/<name>``). The run is offline unless ``WANDB_MODE`` says
otherwise, and lands in ``<report folder>/wandb/``, so ``wandb sync`` uploads it with the
runs (docs/wandb.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from regdrop.report.runs import FINISHED

# A markdown table cell boundary: a `|` that markdown_table did not escape.
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def markdown_tables(text: str) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The first markdown table under each ``## heading`` of ``text``: heading -> (header,
    rows), cells unescaped as they read."""
    tables: dict[str, tuple[list[str], list[list[str]]]] = {}
    heading, lines = None, text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("|") and heading is not None and heading not in tables:
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip().replace("\\|", "|") for c in _CELL_SPLIT.split(lines[i].strip())[1:-1]])
                i += 1
            if len(block) >= 2:
                tables[heading] = (block[0], block[2:])
            continue
        i += 1
    return tables


def sweep_group(job_path: Path) -> str | None:
    """The wandb group of a job's run: the name of its sweep folder (the folder above it
    that holds Hydra's ``multirun.yaml``), as `regdrop.wandb_log` names it; None outside a
    sweep."""
    for folder in Path(job_path).resolve().parents:
        if (folder / "multirun.yaml").is_file():
            return folder.name
    return None


def log_report(report, out_dir: Path) -> str:
    """Log ``report`` (a `regdrop.report.Report`) into one wandb run of the sweep's group;
    returns the run's folder."""
    import wandb

    jobs = report.jobs
    groups = [g for g in (sweep_group(job.path) for job in jobs) if g]
    group = groups[0] if groups else Path(out_dir).resolve().name
    logger = jobs[0].config.get("logger") if jobs else None
    project = (logger.get("project") if logger is not None and logger.get("name") == "wandb" else None) or "regdrop"
    entity = logger.get("entity") if logger is not None and logger.get("name") == "wandb" else None
    experiment = next((job.choices.get("experiment") for job in jobs if job.choices.get("experiment")), None)
    tables = markdown_tables(report.path.read_text(encoding="utf-8"))
    run = wandb.init(project=project, entity=entity, group=group, job_type="report", name=f"report {group}",
                     tags=[t for t in ("report", experiment) if t], dir=str(out_dir),
                     mode=os.environ.get("WANDB_MODE") or "offline", reinit="finish_previous",
                     settings=wandb.Settings(silent=True, console="off"),
                     config={"report": str(report.path), "jobs": len(jobs), "group": group})
    try:
        logged: dict[str, Any] = {}
        if "Table" in tables:
            header, rows = tables["Table"]
            logged["report/table"] = wandb.Table(columns=header, data=rows)
        claims = next((tables[h] for h in tables if "claim" in h.lower()), None)
        spec = report.layout.spec
        if claims is not None:
            logged["report/claims"] = wandb.Table(columns=claims[0], data=claims[1])
        elif spec.claims:
            logged["report/claims"] = wandb.Table(
                columns=["better", "than", "metric", "column", "paper"],
                data=[[c.better, c.than, c.metric, c.column or "", c.paper or ""] for c in spec.claims])
        for path in report.figures:
            logged[f"report/figures/{Path(path).stem}"] = wandb.Image(str(path))
        run.log(logged)
        run.summary.update({"jobs": len(jobs), "cells": len(report.layout.cells),
                            "finished": sum(job.status == FINISHED for job in jobs)})
        folder = str(Path(run.dir).parent)
    finally:
        run.finish()
    return folder
