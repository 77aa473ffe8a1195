"""Read a table, not a folder: ``python -m regdrop.report DIR [DIR ...]`` (or ``regdrop-report``).

Reads the job folders of one or several multiruns (every folder below DIR that holds
``.hydra/config.yaml``), groups the jobs by the keys swept across them with the seed
averaged, and writes ``DIR/report.md`` and its figures (``DIR/figures/*.png``): the table in
the paper's layout (the runs' ``table`` config section), every cell's numbers with its 95%
interval, the claims of the table section tested, the baseline's regime, and every job that
is missing, failed, killed, unreadable or still running, named. ``report.json`` (every cell,
seed, claim and regime check) and ``seeds.csv`` (one line per job) carry every number. It reads only the project's own
files (``metrics.jsonl``, ``metrics.json``, ``run.json``), so it works offline and never
trains. See docs/report.md.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from regdrop.errors import ConfigError
from regdrop.report.evidence import (
    ClaimResult,
    RegimeResult,
    check_regime,
    claim_results,
    dumps,
    report_data,
    seeds_csv,
    write_text_atomic,
)
from regdrop.report.runs import (
    DEFAULT_STALE_S,
    FINISHED,
    UNREADABLE,
    ExpectedJob,
    Job,
    find_sweeps,
    load_jobs,
    missing_jobs,
    read_metrics_log,
)
from regdrop.report.table import (
    Layout,
    TableSpec,
    build_layout,
    check_labels,
    check_table,
    place_jobs,
    place_missing,
)

__all__ = ["CannotWrite", "NoRuns", "Report", "check_table", "load_jobs", "main", "read_metrics_log",
           "write_report"]


class NoRuns(Exception):
    """The folders hold no job (no ``.hydra/config.yaml`` below them)."""


class CannotWrite(Exception):
    """The report's folder cannot be written (read-only, not a folder, full): nothing of
    the report was written, and nothing already there changed."""

    def __init__(self, path: Path, err: OSError, chose_out: bool) -> None:
        reason = errno.errorcode.get(err.errno or 0, "error")
        advice = ("choose another folder with --out DIR" if chose_out else
                  "write the report elsewhere with --out DIR (the runs are only read)")
        super().__init__(f"cannot write the report into {path} ({reason}: "
                         f"{err.strerror or err}); {advice}. Nothing was written and "
                         "nothing there changed.")


REPORT_FILES = ("report.md", "report.json", "seeds.csv")


def _check_writable(out_dir: Path, chose_out: bool) -> None:
    """Create ``out_dir`` and try one temporary file in it before writing anything."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".report-probe-"):
            pass
        for name in REPORT_FILES:
            if (out_dir / name).exists() and not os.access(out_dir / name, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES),
                                      str(out_dir / name))
    except OSError as err:
        raise CannotWrite(out_dir, err, chose_out) from None


@dataclass
class Report:
    """What `write_report` wrote and read."""

    path: Path
    figures: list[Path]
    jobs: list[Job]
    layout: Layout
    missing: list[ExpectedJob]  # jobs the sweeps launch with no folder and no cell
    claims: list[ClaimResult] = field(default_factory=list)
    regimes: list[RegimeResult] = field(default_factory=list)
    json_path: Path | None = None
    csv_path: Path | None = None


def _table_section(jobs: Sequence[Job], notes: list[str]):
    """The first job's ``table`` section; a note when jobs disagree about it."""
    sections = [(job, job.config.get("table")) for job in jobs if job.status != UNREADABLE]
    given = [(job, s) for job, s in sections if s is not None]
    if not given:
        return None
    first_job, first = given[0]
    plain = OmegaConf.to_container(first, resolve=True)
    if any(OmegaConf.to_container(s, resolve=True) != plain for _, s in given[1:]) or \
            len(given) < len(sections):
        notes.append(f"The jobs carry different `table` sections; the layout is the one of "
                     f"`{first_job.path.name}`.")
    return first


def write_report(roots: Sequence[str | Path], out: str | Path | None = None, *,
                 stale_s: float = DEFAULT_STALE_S, figures: bool = True) -> Report:
    """Read every job below ``roots`` and write ``report.md`` (and ``figures/``) into
    ``out`` (default: the first root).

    Also writes ``report.json`` (every cell, seed, claim and regime check) and
    ``seeds.csv`` (one line per job) beside it. Raises `NoRuns` when no job is found,
    `ConfigError` for a bad ``table`` section, and `CannotWrite` (before writing anything)
    when ``out`` cannot be written.
    """
    from regdrop.report.figures import draw_figures
    from regdrop.report.markdown import render

    roots = [Path(r) for r in roots]
    for root in roots:
        if not root.is_dir():
            raise NoRuns(f"{root} is not a folder")
    jobs = load_jobs(roots, stale_s=stale_s)
    if not jobs:
        where = ", ".join(str(r) for r in roots)
        raise NoRuns(f"no runs in {where} (no job folder with .hydra/config.yaml below it)")
    notes: list[str] = []
    spec = TableSpec.from_section(_table_section(jobs, notes))
    sweeps = find_sweeps(roots)
    notes += [f"`{sweep.root / 'multirun.yaml'}` could not be read ({sweep.error}): the jobs "
              "it launched that have no folder cannot be named." for sweep in sweeps
              if sweep.error]
    # A job whose config cannot be read has no values to place it by: it joins the cell of
    # the jobs with its overrides, or is named apart.
    blind = [job for job in jobs if job.status == UNREADABLE and not job.config]
    layout = build_layout([job for job in jobs if all(job is not b for b in blind)], spec,
                          [key for sweep in sweeps for key in sweep.swept])
    place_jobs(layout, blind)
    missing = place_missing(layout, missing_jobs(sweeps, jobs))
    check_labels(layout)
    out_dir = Path(out) if out is not None else roots[0]
    _check_writable(out_dir, chose_out=out is not None)
    claims = claim_results(layout)
    regimes = check_regime(layout)
    made = datetime.now().strftime("%Y-%m-%d %H:%M")
    try:
        drawn = draw_figures(layout, out_dir / "figures") if figures else []
    except OSError as err:
        raise CannotWrite(out_dir / "figures", err, out is not None) from None
    labels = {(cell.row, cell.column) for cell in layout.cells.values()}
    for row, cols in spec.reference.items():
        for col in cols:
            if (row, col) not in labels:
                notes.append(f"The paper's value for row `{row}`, column `{col}` matches no "
                             "cell of these runs.")
    placed = {id(job) for cell in layout.cells.values() for job in cell.jobs}
    notes += [f"`{job.path}` is in no cell: {job.detail}." for job in jobs
              if id(job) not in placed]
    path = out_dir / "report.md"
    text = render(layout, jobs, missing, roots, out_dir, drawn, notes, claims, regimes, made)
    data = report_data(layout, jobs, missing, claims, regimes, made)
    try:
        write_text_atomic(out_dir / "report.json", dumps(data))
        write_text_atomic(out_dir / "seeds.csv", seeds_csv(layout, jobs))
        write_text_atomic(path, text)
    except OSError as err:
        raise CannotWrite(out_dir, err, out is not None) from None
    return Report(path, [p for _, p in drawn], jobs, layout, missing, claims, regimes,
                  out_dir / "report.json", out_dir / "seeds.csv")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``regdrop-report DIR [DIR ...] [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="regdrop-report",
        description="Aggregate the jobs of one or several multirun folders into report.md "
                    "and figures: mean ± std over seeds per cell, the paper's numbers beside "
                    "ours, and every missing, failed, killed or running job named.")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="multirun folder(s) to read")
    parser.add_argument("--out", metavar="DIR",
                        help="where report.md and figures/ go (default: the first DIR)")
    parser.add_argument("--stale-minutes", type=float, default=DEFAULT_STALE_S / 60,
                        metavar="M", help="a 'running' job whose files have not changed for "
                        "M minutes is reported as killed (default: %(default)g)")
    parser.add_argument("--no-figures", action="store_true", help="write report.md only")
    parser.add_argument("--wandb", action="store_true", help="also log the table, claims and "
                        "figures into one wandb run of the sweep's group (offline unless "
                        "WANDB_MODE says otherwise; docs/wandb.md)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.dirs, args.out, stale_s=args.stale_minutes * 60,
                              figures=not args.no_figures)
    except NoRuns as err:
        print(f"regdrop-report: {err}", file=sys.stderr)
        return 1
    except ConfigError as err:
        print(f"regdrop-report: error in the runs' config: {err}", file=sys.stderr)
        return 2
    except CannotWrite as err:
        print(f"regdrop-report: {err}", file=sys.stderr)
        return 2
    finished = sum(job.status == FINISHED for job in report.jobs)
    print(f"{report.path}: {len(report.jobs)} job(s), {finished} finished, "
          f"{len(report.layout.cells)} cell(s), {len(report.figures)} figure(s)")
    if args.wandb:
        from regdrop.report.wandb import log_report

        print(f"wandb run: {log_report(report, report.path.parent)}")
    return 0
