"""The report's table: which jobs form a cell, where the cell sits, and its numbers.

Jobs are grouped by the keys swept across them (their overrides), the seed averaged. The
``table`` config section (experiment files set it) places the cells in the paper's layout:
rows and columns are dotted config keys, a label is their values joined by `` / ``.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from regdrop.errors import ConfigError, check_keys
from regdrop.report.runs import (
    FINISHED,
    ExpectedJob,
    Job,
    finite,
    format_value,
    ignored_key,
    natural_key,
    result_overrides,
)
from regdrop.runfolder import SUMMARY

# Summary keys (metrics.json) a table can report, and what each one is.
METRICS = {
    "best/test_acc": "best test accuracy over evaluations",
    "test/acc": "final test accuracy",
    "test/loss": "final test loss",
    "train/loss": "final training loss (the last epoch's mean)",
}
ACCURACY_METRICS = ("best/test_acc", "test/acc")
TABLE_KEYS = ("title", "source", "rows", "columns", "metric", "as_error", "reference",
              "loss_target", "loss_window", "baseline", "regime", "claims")
CLAIM_KEYS = ("better", "than", "metric", "column", "paper")
REGIME_KEYS = ("needs", "min_gap", "max_gap", "column")
REGIMES = {"overfitting": "min_gap", "underfitting": "max_gap"}  # regime -> its threshold key
DEFAULT_LOSS_WINDOW = 20  # optimizer steps in the moving mean that `loss_target` is read on
DEFAULT_METRIC = "best/test_acc"
_DOTTED_KEY = re.compile(r"^[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*$")


@dataclass(frozen=True)
class Claim:
    """A paper's claim the report tests: row ``better`` beats row ``than`` on ``metric``
    (higher for accuracies, lower for losses), in ``column`` when the table has columns."""

    better: str
    than: str
    metric: str
    column: str | None = None
    paper: str | None = None

    @property
    def higher_is_better(self) -> bool:
        return self.metric in ACCURACY_METRICS


@dataclass(frozen=True)
class Regime:
    """The regime a claim needs, checked on the baseline row: ``overfitting`` (final train
    acc - test acc above ``gap``) or ``underfitting`` (the gap below ``gap``); ``column``
    when the table's columns are settings."""

    needs: str
    gap: float
    column: str | None = None


@dataclass
class TableSpec:
    """A checked ``table`` section (or the defaults when a run has none)."""

    title: str | None = None
    source: str | None = None
    rows: list[str] | None = None  # None: every swept key but the seed
    columns: list[str] = field(default_factory=list)
    metric: str = DEFAULT_METRIC
    as_error: bool = False
    reference: dict[str, dict[str, float | None]] = field(default_factory=dict)
    loss_target: float | None = None
    loss_window: int = DEFAULT_LOSS_WINDOW
    baseline: str | None = None
    regime: list[Regime] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)

    @classmethod
    def from_section(cls, section: Any) -> TableSpec:
        """Check ``section`` (`check_table`) and return it as a `TableSpec`."""
        check_table(section)
        if section is None:
            return cls()
        data = _plain(section)
        reference = {
            format_value(row): {format_value(col): (None if v is None else float(v))
                                for col, v in (cols or {}).items()}
            for row, cols in (data.get("reference") or {}).items()
        }
        return cls(
            title=data.get("title"),
            source=data.get("source"),
            rows=list(data["rows"]) if data.get("rows") is not None else None,
            columns=list(data.get("columns") or []),
            metric=data.get("metric") or DEFAULT_METRIC,
            as_error=bool(data.get("as_error", False)),
            reference=reference,
            loss_target=None if data.get("loss_target") is None else float(data["loss_target"]),
            loss_window=int(data.get("loss_window") or DEFAULT_LOSS_WINDOW),
            baseline=_label_text(data.get("baseline")),
            regime=[Regime(r["needs"], float(r[REGIMES[r["needs"]]]), _label_text(r.get("column")))
                    for r in _as_list(data.get("regime"))],
            claims=[Claim(_label_text(c["better"]), _label_text(c["than"]),
                          c.get("metric") or data.get("metric") or DEFAULT_METRIC,
                          _label_text(c.get("column")), c.get("paper"))
                    for c in data.get("claims") or []],
        )


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _label_text(value: Any) -> str | None:
    """A row or column label as the report prints it (YAML may read ``12000`` as a number)."""
    return None if value is None else format_value(value)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_key_list(value: Any, key: str, *, allow_empty: bool) -> list[str]:
    if value is None:
        return []
    example = "[dropout.name]" if key == "table.rows" else "[data.name] or []"
    if not isinstance(value, list | tuple):
        raise ConfigError(key, f"must be a list of dotted config keys such as {example}, "
                               f"got {value!r}")
    if not value and not allow_empty:
        raise ConfigError(key, f"must name at least one config key, such as {example}; "
                               "leave it out (null) to use every swept key")
    bad = [k for k in value if not isinstance(k, str) or not _DOTTED_KEY.match(k)]
    if bad:
        raise ConfigError(key, f"{bad[0]!r} is not a dotted config key (such as "
                               f"dropout.name or model.width); got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(key, f"names a key twice: {value!r}")
    return list(value)


def check_table(section: Any) -> None:
    """Raise `ConfigError` (``table.<key>``) unless ``section`` is a valid ``table`` section.

    ``None`` is valid (no table: the report uses every swept key as rows). The keys:
    ``title`` and ``source`` (text), ``rows`` and ``columns`` (lists of dotted config keys;
    ``columns`` may be empty), ``metric`` (one of `METRICS`), ``as_error`` (report the test
    error ``100 * (1 - acc)`` in %, for an accuracy metric), ``reference`` (the paper's
    numbers: row label -> column label -> value in the paper's unit, %) and ``loss_target``
    (a training loss: the report gives the optimizer steps each cell takes until the
    moving mean of its last ``loss_window`` step losses reaches it), ``baseline`` (the label
    of the row without any regularization), ``regime`` (the regime the claims need, checked
    on the baseline: ``{needs: overfitting, min_gap: 0.05}`` or ``{needs: underfitting,
    max_gap: 0.02}``, or a list of such mappings each with ``column:``) and ``claims`` (a
    list of ``{better: row, than: row, metric: key, column: label, paper: text}``). Whether
    the labels name rows and columns of the sweep is checked by the report (`check_labels`).
    """
    if section is None:
        return
    data = _plain(section)
    if not isinstance(data, Mapping):
        raise ConfigError("table", f"must be a mapping with keys {', '.join(TABLE_KEYS)}, or "
                                   f"null; got {data!r}")
    check_keys(data, "table", TABLE_KEYS)
    for key in ("title", "source"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ConfigError(f"table.{key}", f"must be text, got {data[key]!r}")
    rows = _check_key_list(data.get("rows"), "table.rows", allow_empty=False)
    columns = _check_key_list(data.get("columns"), "table.columns", allow_empty=True)
    both = sorted(set(rows) & set(columns))
    if both:
        raise ConfigError("table.columns", f"{both[0]!r} is also in table.rows; a key is "
                                           "either a row key or a column key")
    metric = data.get("metric", DEFAULT_METRIC)
    if metric is None:
        metric = DEFAULT_METRIC
    if metric not in METRICS:
        raise ConfigError("table.metric", f"unknown metric {metric!r}; valid: "
                                          f"{', '.join(METRICS)}")
    as_error = data.get("as_error", False)
    if as_error is not None and not isinstance(as_error, bool):
        raise ConfigError("table.as_error", f"must be true or false, got {as_error!r}")
    if as_error and metric not in ACCURACY_METRICS:
        raise ConfigError("table.as_error", f"true needs an accuracy metric "
                                            f"({', '.join(ACCURACY_METRICS)}), not {metric!r}")
    target = data.get("loss_target")
    if target is not None and not (_is_number(target) and target > 0):
        raise ConfigError("table.loss_target", f"must be a training loss > 0 or null, got "
                                               f"{target!r}")
    window = data.get("loss_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ConfigError("table.loss_window", f"must be a number of optimizer steps >= 1 "
                                               f"(default {DEFAULT_LOSS_WINDOW}), got {window!r}")
    _check_label(data.get("baseline"), "table.baseline", optional=True)
    _check_regime(data.get("regime"))
    _check_claims(data.get("claims"))
    _check_reference(data.get("reference"))


def _check_label(value: Any, key: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, str | int | float) or value == "":
        raise ConfigError(key, "must be a row or column label exactly as the report prints "
                               "it (the keys' values joined by ' / ', e.g. \"gyro / 256 / "
                               f"16\"), got {value!r}")


def _check_regime(regime: Any) -> None:
    if regime is None:
        return
    shape = ("must be {needs: overfitting, min_gap: 0.05} or {needs: underfitting, "
             "max_gap: 0.02} (the baseline's final train acc - test acc, 0-1), or a list of "
             "such mappings each with column: <column label>")
    items = regime if isinstance(regime, list | tuple) else [regime]
    if not items:
        raise ConfigError("table.regime", f"{shape}; got an empty list")
    for i, item in enumerate(items):
        key = "table.regime" if not isinstance(regime, list | tuple) else f"table.regime[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(key, f"{shape}; got {item!r}")
        check_keys(item, key, REGIME_KEYS)
        needs = item.get("needs")
        if needs not in REGIMES:
            raise ConfigError(f"{key}.needs", f"must be one of {', '.join(REGIMES)}, got "
                                              f"{needs!r}")
        threshold = REGIMES[needs]
        other = next(k for k in REGIMES.values() if k != threshold)
        if item.get(other) is not None:
            raise ConfigError(f"{key}.{other}", f"belongs to the other regime; {needs} is "
                                                f"checked against {threshold}")
        gap = item.get(threshold)
        if not (_is_number(gap) and 0 <= gap <= 1):
            raise ConfigError(f"{key}.{threshold}", f"{needs} needs {threshold}: a train - "
                                                    f"test accuracy gap in [0, 1], got {gap!r}")
        _check_label(item.get("column"), f"{key}.column", optional=True)
        if isinstance(regime, list | tuple) and len(items) > 1 and item.get("column") is None:
            raise ConfigError(f"{key}.column", "a list of regimes needs a column label in each "
                                               "(the column whose setting is in that regime)")


def _check_claims(claims: Any) -> None:
    if claims is None:
        return
    shape = ("must be a list of {better: <row label>, than: <row label>, metric: <summary "
             "key>, column: <column label> (optional), paper: <the paper's words>}")
    if not isinstance(claims, list | tuple):
        raise ConfigError("table.claims", f"{shape}; got {claims!r}")
    for i, claim in enumerate(claims):
        key = f"table.claims[{i}]"
        if not isinstance(claim, Mapping):
            raise ConfigError(key, f"{shape}; got {claim!r}")
        check_keys(claim, key, CLAIM_KEYS)
        for part in ("better", "than"):
            _check_label(claim.get(part), f"{key}.{part}", optional=False)
        if format_value(claim["better"]) == format_value(claim["than"]):
            raise ConfigError(f"{key}.than", f"names the same row as better "
                                             f"({claim['better']!r}); a claim compares two rows")
        metric = claim.get("metric")
        if metric is not None and metric not in METRICS:
            raise ConfigError(f"{key}.metric", f"unknown metric {metric!r}; valid: "
                                               f"{', '.join(METRICS)}")
        _check_label(claim.get("column"), f"{key}.column", optional=True)
        paper = claim.get("paper")
        if paper is not None and not isinstance(paper, str):
            raise ConfigError(f"{key}.paper", f"must be text (the paper's words), got {paper!r}")


def _check_reference(reference: Any) -> None:
    if reference is None:
        return
    shape = ("must map row labels to {column label: the paper's value}, e.g. "
             "{standard: {cifar10: 77.9}}")
    if not isinstance(reference, Mapping):
        raise ConfigError("table.reference", f"{shape}; got {reference!r}")
    for row, cols in reference.items():
        if not isinstance(cols, Mapping):
            raise ConfigError(f"table.reference.{row}", f"{shape}; got {cols!r}")
        for col, value in cols.items():
            if value is not None and not _is_number(value):
                raise ConfigError(f"table.reference.{row}.{col}",
                                  f"must be a number in the paper's unit (%) or null, "
                                  f"got {value!r}")


# -- cells ----------------------------------------------------------------------------------


def swept_keys(jobs: Sequence[Job], launched: Sequence[str] = ()) -> list[str]:
    """The override keys whose value differs across ``jobs`` (in first-seen order), then
    the keys the sweeps were ``launched`` with several values of (a job that never got a
    folder still has its own cell), without the seed and the keys that do not change a
    result (`regdrop.runfolder.OUTSIDE_RESULT`)."""
    keys: list[str] = []
    for job in jobs:
        for written in job.overrides:
            key = written.lstrip("+~")
            if key not in keys and not ignored_key(key):
                keys.append(key)
    swept = [k for k in keys if len({job.override_value(k) for job in jobs}) > 1]
    for written in launched:
        key = written.lstrip("+~")
        if key not in swept and not ignored_key(key):
            swept.append(key)
    return swept


@dataclass
class Stat:
    """Mean, sample standard deviation and count of a list of numbers."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        numbers = [v for v in values if v is not None]
        if not numbers:
            return cls(None, None, 0)
        std = statistics.stdev(numbers) if len(numbers) > 1 else None
        return cls(statistics.fmean(numbers), std, len(numbers))

    def text(self, digits: int = 2, *, with_n: bool = True) -> str:
        if self.mean is None:
            return "—"
        out = f"{self.mean:.{digits}f}"
        if self.std is not None:
            out += f" ± {self.std:.{digits}f}"
        return out + (f" (n={self.n})" if with_n else "")


@dataclass
class Cell:
    """The jobs of one table cell (all seeds of one configuration)."""

    row: str
    column: str
    jobs: list[Job] = field(default_factory=list)
    duplicates: list[Job] = field(default_factory=list)  # finished again with a seed counted
    missing: list[ExpectedJob] = field(default_factory=list)  # launched, but no folder

    @property
    def label(self) -> str:
        return self.row if self.column == "all" else f"{self.row} [{self.column}]"

    @property
    def finished(self) -> list[Job]:
        return [j for j in self.jobs if j.status == FINISHED and j not in self.duplicates]

    @property
    def unfinished(self) -> list[Job]:
        return [j for j in self.jobs if j.status != FINISHED]

    def problems(self) -> str:
        """``1 killed, 1 failed``: the jobs of this cell that are not in its numbers."""
        counts: dict[str, int] = {}
        for job in self.unfinished:
            counts[job.status] = counts.get(job.status, 0) + 1
        for expected in self.missing:
            counts[expected.status] = counts.get(expected.status, 0) + 1
        return ", ".join(f"{n} {status}" for status, n in counts.items())

    def values(self, key: str) -> list[float | None]:
        return [finite(job.summary.get(key)) for job in self.finished]

    def per_epoch(self, key: str) -> list[float | None]:
        out = []
        for job in self.finished:
            seconds, epochs = finite(job.summary.get(key)), finite(job.summary.get("epoch"))
            out.append(seconds / epochs if seconds is not None and epochs else None)
        return out

    @property
    def complete(self) -> bool:
        """Every job of the cell finished (none failed, killed, running or missing)."""
        return not self.unfinished and not self.missing and bool(self.finished)

    def by_seed(self, key: str) -> dict[str, float | None]:
        """The finished jobs' ``key`` keyed by seed (as text)."""
        return {format_value(job.seed): finite(job.summary.get(key)) for job in self.finished}

    def train_acc(self) -> list[float | None]:
        """Per seed: the final training accuracy (`final_train_acc`)."""
        return [final_train_acc(job) for job in self.finished]

    def steps_to_loss(self, target: float, window: int = DEFAULT_LOSS_WINDOW) -> list[float | None]:
        """Per seed: the optimizer steps until the moving mean of the last ``window`` step
        losses (metrics.jsonl, one record per step) first is <= target (None when it never
        is). A moving mean, not single steps: one lucky batch is not reaching a loss."""
        return [steps_to_loss(job.train, target, window) for job in self.finished]


def final_train_acc(job: Job) -> float | None:
    """The run's final training accuracy: the last epoch's mean over its steps, measured as
    logged (dropout on). From metrics.json (``test/acc + gap/acc``), else from the last
    evaluation record's ``train/epoch_acc``."""
    summary = job.summary or {}
    test, gap = finite(summary.get("test/acc")), finite(summary.get("gap/acc"))
    if test is not None and gap is not None:
        return test + gap
    for record in reversed(job.evals):
        if (acc := finite(record.get("train/epoch_acc"))) is not None:
            return acc
    return None


def steps_to_loss(records: Sequence[Mapping[str, Any]], target: float,
                  window: int = DEFAULT_LOSS_WINDOW) -> float | None:
    """Optimizer steps (a step record's ``step`` + 1) until the mean of the last ``window``
    step records' ``train/loss`` first is <= ``target``; None when it never is (or the run
    has fewer than ``window`` steps)."""
    recent: list[float] = []
    for record in sorted(records, key=lambda r: r["step"]):
        loss = finite(record.get("train/loss"))
        if loss is None:
            continue
        recent.append(loss)
        if len(recent) > window:
            recent.pop(0)
        if len(recent) == window and statistics.fmean(recent) <= target:
            return float(record["step"] + 1)
    return None


@dataclass
class Layout:
    """The cells in table order, with the keys that placed them."""

    spec: TableSpec
    row_keys: list[str]
    column_keys: list[str]
    extra_keys: list[str]  # swept keys the table's rows/columns missed, added to the rows
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], Cell]

    def ordered_cells(self) -> list[Cell]:
        return [self.cells[(r, c)] for r in self.rows for c in self.columns
                if (r, c) in self.cells]


def _label(job: Job, keys: Sequence[str], extra: Sequence[str] = ()) -> str:
    parts = [v for v in (job.override_value(k) for k in keys) if v is not None]
    parts += [f"{k}={v}" for k in extra if (v := job.override_value(k)) is not None]
    return " / ".join(parts) if parts else "all"


def build_layout(jobs: Sequence[Job], spec: TableSpec, launched: Sequence[str] = ()) -> Layout:
    """Group ``jobs`` into cells: one cell per combination of swept values (the seed
    averaged), placed by the spec's row and column keys.

    Jobs that differ in a swept key the spec does not name would share a cell: such keys
    are added to the row labels (as ``key=value``), never silently merged. ``launched``:
    the keys the sweeps vary (`Sweep.swept`), swept even where the folders agree on them.
    """
    swept = swept_keys(jobs, launched)
    row_keys = list(spec.rows) if spec.rows is not None else swept
    column_keys = list(spec.columns)

    def identity(job: Job) -> tuple:
        return tuple(job.override_value(k) for k in swept)

    extra: list[str] = []
    while True:
        groups: dict[tuple[str, str], set[tuple]] = {}
        for job in jobs:
            place = (_label(job, row_keys, extra), _label(job, column_keys))
            groups.setdefault(place, set()).add(identity(job))
        clashes = [ids for ids in groups.values() if len(ids) > 1]
        if not clashes:
            break
        ids = sorted(clashes[0], key=str)
        differing = [k for i, k in enumerate(swept)
                     if len({key[i] for key in ids}) > 1 and k not in extra]
        if not differing:  # cannot happen: different identities differ in some swept key
            break
        extra.append(differing[0])

    cells: dict[tuple[str, str], Cell] = {}
    for job in jobs:
        place = (_label(job, row_keys, extra), _label(job, column_keys))
        cells.setdefault(place, Cell(*place)).jobs.append(job)
    for cell in cells.values():
        _mark_duplicate_seeds(cell)

    layout = Layout(spec, row_keys, column_keys, extra, [], [], cells)
    _order(layout)
    return layout


def _order(layout: Layout) -> None:
    """Rows and columns in the order of the paper's ``reference``, then natural order."""
    def order(labels: set[str], preferred: list[str]) -> list[str]:
        first = [label for label in dict.fromkeys(preferred) if label in labels]
        return first + sorted(labels - set(first), key=natural_key)

    reference = layout.spec.reference
    layout.rows = order({r for r, _ in layout.cells}, list(reference))
    layout.columns = order({c for _, c in layout.cells},
                           [c for cols in reference.values() for c in cols])


def _without_seed(overrides: Mapping[str, str]) -> dict[str, str]:
    """A job's result overrides but the seed: what the jobs of one cell share."""
    return {k: v for k, v in result_overrides(overrides).items() if k != "seed"}


def _cell_with(layout: Layout, wanted: Mapping[str, str]) -> Cell | None:
    """The cell holding a job whose overrides but the seed are ``wanted``, if any."""
    return next((c for c in layout.cells.values()
                 if any(_without_seed(job.overrides) == wanted for job in c.jobs)), None)


def place_missing(layout: Layout, missing: Sequence[ExpectedJob]) -> list[ExpectedJob]:
    """Put each expected job that has no folder into its cell (``Cell.missing``): the cell
    of a job with the same overrides but the seed, or, when every row and column key is an
    override of the expected job, the cell those values name (created if no job has it).
    Returns the ones that could not be placed."""
    unplaced = []
    for expected in missing:
        wanted = _without_seed(expected.overrides)
        cell = _cell_with(layout, wanted)
        keys = layout.row_keys + layout.extra_keys + layout.column_keys
        if cell is None and all(k in wanted for k in keys):
            row_parts = [wanted[k] for k in layout.row_keys]
            row_parts += [f"{k}={wanted[k]}" for k in layout.extra_keys]
            row = " / ".join(row_parts) or "all"
            column = " / ".join(wanted[k] for k in layout.column_keys) or "all"
            cell = layout.cells.setdefault((row, column), Cell(row, column))
        if cell is None:
            unplaced.append(expected)
        else:
            cell.missing.append(expected)
    _order(layout)
    return unplaced


def place_jobs(layout: Layout, jobs: Sequence[Job]) -> list[Job]:
    """Put each job whose config could not be read into the cell of a job with the same
    overrides but the seed (it is then named there, not counted). Returns the ones that
    match no cell."""
    unplaced = []
    for job in jobs:
        cell = _cell_with(layout, _without_seed(job.overrides))
        if cell is None or not job.overrides:
            unplaced.append(job)
        else:
            cell.jobs.append(job)
    return unplaced


def _mark_duplicate_seeds(cell: Cell) -> None:
    """Count each seed once: of several finished jobs with one seed, keep the newest."""
    by_seed: dict[str, list[Job]] = {}
    for job in cell.jobs:
        if job.status == FINISHED:
            by_seed.setdefault(format_value(job.seed), []).append(job)
    for same in by_seed.values():
        if len(same) > 1:
            same.sort(key=lambda j: (j.path / SUMMARY).stat().st_mtime)
            cell.duplicates.extend(same[:-1])


# -- numbers in the paper's unit ------------------------------------------------------------


def in_unit(value: float | None, metric: str, as_error: bool) -> float | None:
    """An accuracy as % (or the error ``100 * (1 - acc)`` when ``as_error``); other
    metrics unchanged."""
    if value is None or metric not in ACCURACY_METRICS:
        return value
    return 100.0 * (1.0 - value) if as_error else 100.0 * value


def metric_header(metric: str, as_error: bool) -> str:
    names = {"best/test_acc": "best test", "test/acc": "final test"}
    if metric in names:
        return f"{names[metric]} {'error' if as_error else 'acc.'} (%)"
    return {"test/loss": "final test loss", "train/loss": "final train loss"}[metric]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                   align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table (``|`` in cells escaped)."""
    def clean(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    align = align or ["l"] + ["r"] * (len(header) - 1)
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(clean(h) for h in header) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def check_labels(layout: Layout) -> None:
    """Raise `ConfigError` (``table.claims[i].better`` ...) when the ``baseline``, a
    ``regime`` or a claim names a row or column the sweep does not have."""
    spec = layout.spec
    rows, columns = set(layout.rows), set(layout.columns)

    def check(label: str | None, key: str, known: set[str], what: str) -> None:
        if label is not None and label not in known:
            raise ConfigError(key, f"{label!r} is not a {what} of these runs; the {what}s "
                                   f"are: {', '.join(repr(x) for x in sorted(known, key=natural_key))}")

    def check_column(label: str | None, key: str) -> None:
        if label is None and layout.column_keys and len(columns) > 1:
            raise ConfigError(key, "the table has columns; name one (one of "
                                   f"{', '.join(repr(c) for c in sorted(columns, key=natural_key))})")
        check(label, key, columns, "column")

    check(spec.baseline, "table.baseline", rows, "row")
    if spec.regime and spec.baseline is None:
        raise ConfigError("table.baseline", "a regime is checked on the baseline row: name it "
                                            "(the label of the row without regularization)")
    for i, regime in enumerate(spec.regime):
        key = "table.regime" if len(spec.regime) == 1 else f"table.regime[{i}]"
        if regime.column is not None:
            check(regime.column, f"{key}.column", columns, "column")
    for i, claim in enumerate(spec.claims):
        key = f"table.claims[{i}]"
        check(claim.better, f"{key}.better", rows, "row")
        check(claim.than, f"{key}.than", rows, "row")
        check_column(claim.column, f"{key}.column")
