"""The results pages, generated from the tables' ``report.json`` files, never typed.

``python -m regdrop.report.index`` rewrites, in ``docs/results/README.md``, each table's
"Current setting" block (between ``<!-- generated: TABLE -->`` and
``<!-- end generated: TABLE -->``) from ``docs/results/TABLE/report.json`` and its
``run_info.txt``: the setting, its regime checks, every claim with its verdict, and every
cell; and in ``README.md`` the one-line summary of each table (between
``<!-- generated: results summary -->`` and ``<!-- end generated: results summary -->``).
A table without a ``report.json`` of its current setting is said to be not run. With
``--check`` it writes nothing and exits 1 when a page differs from what the reports give
(the tests run it so): a number on those pages can only come from a report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regdrop.report.evidence import write_text_atomic
from regdrop.report.markdown import seeds_text
from regdrop.report.table import ACCURACY_METRICS

# (folder, link text, paper) of each mini table, in the pages' order.
TABLES = (
    ("gyro", "Gyro dropout", "Lee et al."),
    ("multisample", "Multi-sample dropout", "Inoue"),
    ("stochastic_depth", "Stochastic depth", "Huang et al.; Composer's card"),
    ("early_dropout", "Early and late dropout and s.d.", "Liu et al."),
    ("dropout_variants", "Dropout, spatial dropout, DropConnect", "Srivastava et al.; Tompson et al.; Wan et al."),
)
SUMMARY = "results summary"


@dataclass(frozen=True)
class TableReport:
    """One table's committed report: its ``report.json`` and ``run_info.txt``."""

    folder: str
    data: dict[str, Any]
    run_info: dict[str, str]

    @classmethod
    def read(cls, results: Path, folder: str) -> TableReport | None:
        path = results / folder / "report.json"
        if not path.is_file():
            return None
        info = {}
        info_path = results / folder / "run_info.txt"
        if info_path.is_file():
            for line in info_path.read_text().splitlines():
                key, sep, value = line.partition(": ")
                if sep:
                    info[key] = value
        return cls(folder, json.loads(path.read_text()), info)


def _number(value: float | None, digits: int, sign: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _digits(metric: str) -> int:
    return 2 if metric in ACCURACY_METRICS else 4


def _summary(summary: dict[str, Any] | None, digits: int) -> str:
    """``mean ± sd (n=k)``, or a dash when no seed finished."""
    if not summary or summary.get("mean") is None:
        return "—"
    sd = summary.get("sd")
    spread = f" ± {sd:.{digits}f}" if sd is not None else ""
    return f"{summary['mean']:.{digits}f}{spread} (n={summary['n']})"


def _interval(low: float | None, high: float | None, digits: int) -> str:
    if low is None or high is None:
        return "—"
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def claim_verdict(claim: dict[str, Any]) -> str:
    """The verdict in bold, and for an inconclusive claim what n would resolve it."""
    text = f"**{claim['verdict']}**"
    if claim["verdict"] == "inconclusive":
        digits = _digits(claim["metric"])
        unit = " points" if claim["metric"] in ACCURACY_METRICS else ""
        detectable = claim.get("detectable")
        if detectable is not None:
            text += f"; the smallest difference these seeds detect: {detectable:.{digits}f}{unit}"
        needed = claim.get("seeds_needed")
        text += f"; {seeds_text(needed)}" + ("" if needed is None else " at 80% power")
    elif claim["verdict"] == "too few seeds" and claim.get("why_not_paired"):
        text += f" ({claim['why_not_paired']})"
    return text


def claim_name(claim: dict[str, Any]) -> str:
    sign = ">" if claim.get("direction", "higher") == "higher" else "<"
    where = "" if claim.get("column") in (None, "all") else f" [{claim['column']}]"
    return f"`{claim['better']}` {sign} `{claim['than']}`{where}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":--" if i == 0 else "--:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return lines


def current_block(report: TableReport) -> list[str]:
    """The "Current setting" block of one table, from its report alone."""
    data, info, folder = report.data, report.run_info, report.folder
    commit = info.get("git commit", "unknown").split()[0][:7]
    lines = [f"### Current setting: report made {data.get('made', '?')}, commit {commit}", ""]
    lines.append(f"[report.md]({folder}/report.md), [report.json]({folder}/report.json), "
                 f"[seeds.csv]({folder}/seeds.csv), [run_info.txt]({folder}/run_info.txt): "
                 f"{data.get('title', '')}.")
    if "wall time of the sweep" in info:
        lines += ["", f"Command: `{info.get('command', '?')}`; wall time of the sweep "
                  f"{info['wall time of the sweep'].split(' (')[0]}; {info.get('machine', '')}."]
    lines += ["", "**Regime** (the baseline row's final train − test accuracy gap, in points):", ""]
    for regime in data.get("regime", []):
        threshold_key = "min_gap" if regime["needs"] == "overfitting" else "max_gap"
        gap = regime["baseline_gap_percent"]
        where = "" if regime.get("column") in (None, "all") else f" [{regime['column']}]"
        state = {True: "in the regime", False: "**not** in the regime", None: "not measured"}[regime["in_regime"]]
        side = "above" if regime["needs"] == "overfitting" else "below"
        lines.append(f"- {regime['needs']}{where}: needs the gap of `{data.get('baseline')}` {side} "
                     f"{100 * regime[threshold_key]:g}; measured {_summary(gap, 2)}, 95% CI "
                     f"{_interval(gap.get('ci_low'), gap.get('ci_high'), 2)}: {state}.")
    if not data.get("regime"):
        lines.append("- (the experiment file declares no regime)")
    lines += ["", "**Claims** (better − than, 95% interval; paired by seed where every seed of both "
              "rows finished, Welch otherwise):", ""]
    rows = []
    for claim in data.get("claims", []):
        digits = _digits(claim["metric"])
        rows.append([claim_name(claim), claim.get("paper") or "", f"`{claim['metric']}`",
                     _number(claim.get("difference"), digits, sign=True),
                     _interval(claim.get("ci_low"), claim.get("ci_high"), digits),
                     "—" if claim.get("p_value") is None else f"{claim['p_value']:.3g}",
                     claim.get("test", ""), claim_verdict(claim)])
    lines += _table(["claim", "paper", "metric", "difference", "95% CI", "p", "test", "verdict"], rows) \
        if rows else ["(the experiment file declares no claim)"]
    metric = data.get("metric", "test/acc")
    lines += ["", f"**Cells** (mean ± sample s.d. over the seeds; accuracies in %; the table's metric "
              f"`{metric}`{', as error' if data.get('as_error') else ''}):", ""]
    rows = []
    for cell in data.get("cells", []):
        m = cell.get("metrics", {})
        rows.append([cell["row"], cell["column"], _summary(cell.get("table_metric"), 2),
                     _summary(m.get("train/acc"), 2), _summary(m.get("test/acc"), 2),
                     _summary(m.get("gap/acc"), 2), _summary(m.get("train/loss"), 4),
                     _summary(m.get("test/loss"), 4)])
    lines += _table(["row", "column", f"`{metric}`", "train acc.", "test acc.", "gap", "train loss",
                     "test loss"], rows)
    return lines


def summary_line(folder: str, name: str, paper: str, report: TableReport | None) -> str:
    link = f"[{name}](docs/results/{folder}/report.md) ({paper})"
    if report is None:
        return f"- {link}: the current setting has not been run."
    claims = report.data.get("claims", [])
    if not claims:
        return f"- {link}: no claim declared."
    verdicts = "; ".join(f"{claim_name(c)} ({c['metric']}) {c['verdict']}" for c in claims)
    return f"- {link}: {verdicts}."


def replace_block(text: str, name: str, lines: Sequence[str]) -> str:
    """``text`` with the block between the markers of ``name`` replaced by ``lines``."""
    begin, end = f"<!-- generated: {name} -->", f"<!-- end generated: {name} -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"no block `{begin}` ... `{end}` in the page")
    return pattern.sub(lambda _: "\n".join([begin, *lines, end]), text)


def is_current(report: TableReport | None, root: Path) -> bool:
    """A report whose recorded setting is the experiment file's (and rows') present one:
    otherwise the table's current setting has not been run."""
    if report is None:
        return False
    files = report.run_info.get("setting files", "").split()
    recorded = next((v for k, v in report.run_info.items() if k.startswith("setting sha256")), None)
    if not files or recorded is None:
        return False
    try:
        digest = hashlib.sha256(b"".join((root / f).read_bytes() for f in files)).hexdigest()
    except OSError:
        return False
    return digest == recorded


def generate(root: Path) -> dict[Path, str]:
    """The two pages as the reports under ``root/docs/results`` make them."""
    results = root / "docs" / "results"
    index, readme = results / "README.md", root / "README.md"
    pages = {index: index.read_text(), readme: readme.read_text()}
    summary = []
    for folder, name, paper in TABLES:
        report = TableReport.read(results, folder)
        current = report if is_current(report, root) else None
        block = current_block(current) if current else \
            ["(The current setting has not been run: the settings below are earlier ones.)"]
        pages[index] = replace_block(pages[index], folder, ["", *block, ""])
        summary.append(summary_line(folder, name, paper, current))
    pages[readme] = replace_block(pages[readme], SUMMARY, ["", *summary, ""])
    return pages


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regdrop.report.index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the project's root (default: .)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a page is out of date")
    args = parser.parse_args(argv)
    try:
        pages = generate(args.root)
    except (OSError, ValueError) as err:
        print(f"regdrop.report.index: {err}", file=sys.stderr)
        return 2
    stale = [path for path, text in pages.items() if path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path} differs from what the reports give: run python -m regdrop.report.index",
                  file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        write_text_atomic(path, pages[path])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
