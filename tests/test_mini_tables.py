"""The mini tables of docs/results/: `scripts/mini_table.sh TABLE` and conf/experiment/mini_*.yaml.

* The command runs the experiment file's sweep: every job of it composes and passes the
  run's checks (one seed: the seed changes no check) and lands in its own cell of the
  table's layout.
* Every mini experiment trains end to end at smoke size (one job per table, on the real
  Fashion-MNIST when the Debian package is installed, else on the synthetic stand-in).
* The command refuses an unknown table.
* Each table's report is committed under docs/results/ and linked from both READMEs.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from regdrop.config import validate
from regdrop.report.table import TableSpec
from regdrop.train import train
from tests.conftest import CONF, FASHION_MNIST_INSTALLED, ROOT

SCRIPT = ROOT / "scripts" / "mini_table.sh"
TABLES = ["gyro", "multisample", "stochastic_depth", "early_dropout", "dropout_variants"]
# Jobs per table at one seed: the rows (and columns) the report must show.
CELLS = {"gyro": 4, "multisample": 5, "stochastic_depth": 3, "early_dropout": 8,
         "dropout_variants": 9}


@functools.cache
def sweep(table: str) -> tuple[str, ...]:
    """The overrides of the `python train.py -m` the command runs (from its --dry-run)."""
    result = subprocess.run(["bash", str(SCRIPT), table, "--dry-run"], capture_output=True,
                            text=True, check=True, cwd=ROOT, env={**os.environ, "SEEDS": "0"})
    [command] = [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]
    assert command[1:3] == ["train.py", "-m"], result.stdout
    return tuple(command[3:])


def compose_with_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@functools.cache
def expand(overrides: tuple[str, ...]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of a command line: the experiment file's
    ``hydra.sweeper.params`` and the command's own sweeps, the command line winning."""
    command = [o for o in overrides if not o.startswith("hydra.")]
    plain = [o.split("=")[0] for o in command]
    params = compose_with_hydra([o for o in overrides if o.startswith(("experiment=", "hydra.sweeper"))]
                                ).hydra.sweeper.params
    lines = [f"{k}={v}" for k, v in (OmegaConf.to_container(params) if params else {}).items()
             if k not in plain] + command
    parsed = OverridesParser.create().parse_overrides(lines)
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
            if o.is_sweep_override() else [o.input_line] for o in parsed]
    return [list(job) for job in itertools.product(*axes)]


def job_config(overrides: list[str], output_dir: Path):
    cfg = compose_with_hydra(overrides)
    with open_dict(cfg):
        del cfg["hydra"]
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.data_dir = str(output_dir / "data")
    return cfg


@pytest.mark.parametrize("table", TABLES)
def test_every_job_of_the_table_composes_validates_and_has_its_own_cell(table, tmp_path):
    jobs = expand(sweep(table))
    assert all(f"experiment=mini_{table}" in job and "seed=0" in job for job in jobs)
    places = set()
    for job in jobs:
        cfg = job_config(job, tmp_path)
        with open_dict(cfg):
            cfg.data.download = True  # where the data is does not matter to the checks
        validate(cfg)
        assert cfg.trainer.threads == 1 and cfg.logger.name == "none"
        spec = TableSpec.from_section(cfg.table)
        place = tuple(str(OmegaConf.select(cfg, k)) for k in (*spec.rows, *spec.columns)
                      if OmegaConf.select(cfg, k) is not None)
        places.add(place)
    assert len(jobs) == CELLS[table] and len(places) == len(jobs), sorted(places)


# One job per table, made tiny: a few steps on a few hundred images.
SMOKE = ["trainer=smoke", "trainer.device=cpu", "trainer.epochs=1", "data.batch_size=16",
         "data.eval_batch_size=100", "seed=0"]


# The job each table runs at smoke size: the one furthest from plain training.
SMOKE_ROW = {"gyro": "arm=gyro_s256_t4", "multisample": "arm=ms_m8",
             "stochastic_depth": "arm=sd_block",
             "early_dropout": "arm=mini_liu_early_dropout",
             "dropout_variants": "arm=var_cuda_convnet_dropconnect"}


def smoke_job(table: str) -> list[str]:
    data = ["data.subset=256"] if FASHION_MNIST_INSTALLED else \
        ["data=synthetic", "data.num_train=256", "data.num_test=100"]
    ours = {o.split("=")[0] for o in [*SMOKE, *data]}
    [job] = [job for job in expand(sweep(table)) if SMOKE_ROW[table] in job]
    return [*(o for o in job if o.split("=")[0] not in ours), *SMOKE, *data]


@pytest.mark.parametrize("table", TABLES)
def test_every_mini_experiment_trains_end_to_end_at_smoke_size(table, tmp_path):
    cfg = job_config(smoke_job(table), tmp_path / "run")
    with open_dict(cfg):
        if "cutoff_epoch" in cfg.schedule:
            cfg.schedule.cutoff_epoch = 0.01  # inside the 4 smoke steps
        if cfg.diagnostics.name != "none":
            cfg.diagnostics.every = [0, 2]
    summary = train(cfg)
    assert summary["step"] == 4 and math.isfinite(summary["train/loss"])
    assert 0 <= summary["test/acc"] <= 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    if cfg.diagnostics.name != "none":
        assert [r["step"] for r in records if "diag/gdv" in r] == [0, 2]


def test_an_unknown_table_is_refused_with_the_valid_names():
    result = subprocess.run(["bash", str(SCRIPT), "gyr0", "--dry-run"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "unknown table 'gyr0'" in result.stderr and "early_dropout" in result.stderr


def test_every_table_has_its_committed_report_linked_from_both_readmes():
    """docs/results/TABLE holds each table's report, figures and run_info.txt; the README
    and docs/results/README.md link every report, and each `mini_table.sh` command they
    show names a table the script knows."""
    results = ROOT / "docs" / "results"
    readme, index = (ROOT / "README.md").read_text(), (results / "README.md").read_text()
    for table in TABLES:
        report = (results / table / "report.md").read_text()
        figures = re.findall(r"!\[[^]]*\]\((figures/[^)]+\.png)\)", report)
        assert figures and all((results / table / f).is_file() for f in figures), table
        assert "wall time of the sweep" in (results / table / "run_info.txt").read_text()
        assert f"(docs/results/{table}/report.md)" in readme, table
        assert f"({table}/report.md)" in index, table
    shown = set(re.findall(r"mini_table\.sh (\w+)", readme + index)) - {"TABLE"}
    assert shown and shown <= set(TABLES), shown


NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*(?:\.\d+)?(?![\w])")
GENERATED = re.compile(r"<!-- generated: ([\w ]+) -->.*?<!-- end generated: \1 -->", re.S)


def test_every_number_of_the_results_pages_is_in_a_committed_report():
    """Generated, not typed: every number in a table's section of docs/results/README.md
    appears in one of the committed reports (report.md, report.json, run_info.txt,
    committed.txt) that section links; every number in the README's "Results at mini
    scale" lines appears in a report of its table. Dates, commits and counts in the
    section headings and links are of the linked files too."""
    results = ROOT / "docs" / "results"
    # The generated blocks are checked whole against their reports by the next test.
    index = GENERATED.sub("", (results / "README.md").read_text())
    sections = re.split(r"^## ", index, flags=re.M)
    checked = 0
    for section in sections:
        links = re.findall(r"\]\(([a-z_]+/(?:history/[\w-]+/)?report\.(?:md|json))\)", section)
        if not links:
            continue
        sources = ""
        for link in links:
            folder = (results / link).parent
            sources += "".join(p.read_text() for p in folder.glob("*")
                               if p.name in ("report.md", "report.json", "run_info.txt",
                                             "committed.txt"))
        body = re.sub(r"\]\([^)]*\)", "]", section)  # link targets are file names
        body = re.sub(r"mini_\w+\.yaml|commit [0-9a-f]{7}", "", body)
        for number in NUMBER.findall(body):
            assert number in sources or number.replace(",", "") in sources, \
                (section.splitlines()[0], number)
            checked += 1
    assert checked > 100
    readme = GENERATED.sub("", (ROOT / "README.md").read_text())
    lines = readme.split("### Results at mini scale", 1)[1].split("\n## ", 1)[0]
    for item in re.findall(r"^- \[.*?(?=^- \[|\Z)", lines, flags=re.M | re.S):
        table = re.search(r"docs/results/(\w+)/report\.md", item).group(1)
        sources = "".join(p.read_text() for p in (results / table).rglob("*")
                          if p.suffix in (".md", ".json", ".txt"))
        body = re.sub(r"\]\([^)]*\)", "]", item)
        for number in NUMBER.findall(body):
            assert number in sources or number.replace(",", "") in sources, (table, number)
    assert "reproduced" not in lines.replace("No claim is reproduced or refuted", "")
    assert not re.search(r"\*\*(held|not held|reproduced)\*\*", index, flags=re.I)


def test_the_results_pages_are_what_the_committed_reports_give():
    """docs/results/README.md's current-setting blocks and the README's summary lines are
    exactly what `python -m regdrop.report.index` makes of the committed report.json files."""
    from regdrop.report.index import main

    assert main(["--check", "--root", str(ROOT)]) == 0


def test_the_index_writes_a_tables_claims_from_its_report_and_only_for_its_current_setting(tmp_path):
    """A table whose report.json was made with the present experiment file and rows gets
    its regime, claims (verdict, interval) and cells on the page and its verdicts in the
    README's line; a row file changed since makes it "not run" again."""
    from regdrop.report import main as report
    from regdrop.report.index import generate
    from tests.test_report import config_of, finished_job

    root = tmp_path / "project"
    (root / "conf" / "arm").mkdir(parents=True)
    (root / "conf" / "experiment").mkdir()
    experiment = root / "conf" / "experiment" / "mini_gyro.yaml"
    experiment.write_bytes((CONF / "experiment" / "mini_gyro.yaml").read_bytes())
    rows = yaml.safe_load(experiment.read_text())["hydra"]["sweeper"]["params"]["arm"].split(",")
    for row in rows:
        (root / "conf" / "arm" / f"{row}.yaml").write_bytes((CONF / "arm" / f"{row}.yaml").read_bytes())
    results = root / "docs" / "results"
    results.mkdir(parents=True)
    (results / "README.md").write_text("".join(f"## {t}\n<!-- generated: {t} -->\n<!-- end generated: {t} -->\n"
                                              for t in SMOKE_ROW))
    (root / "README.md").write_text("### Results at mini scale\n<!-- generated: results summary -->\n"
                                    "<!-- end generated: results summary -->\n")
    runs = tmp_path / "runs"
    table = {"rows": ["dropout.name"], "baseline": "standard",
             "regime": {"needs": "overfitting", "min_gap": 0.0},
             "claims": [{"better": "gyro", "than": "standard", "metric": "best/test_acc", "paper": "gyro wins"}]}
    for seed, (gyro, standard) in enumerate([(0.80, 0.70), (0.81, 0.72), (0.79, 0.71)]):
        for method, acc in (("gyro", gyro), ("standard", standard)):
            finished_job(runs / f"{method}{seed}", [f"dropout={method}", f"seed={seed}"],
                         config_of(method, 0.5, seed, table=table), acc)
    assert report([str(runs), "--out", str(results / "gyro"), "--no-figures"]) == 0
    setting = [experiment, *(root / "conf" / "arm" / f"{row}.yaml" for row in rows)]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in setting)).hexdigest()
    (results / "gyro" / "run_info.txt").write_text(
        "command: bash scripts/mini_table.sh gyro (SEEDS=0,1,2)\ngit commit: 0123456789abcdef\n"
        f"setting files: {' '.join(str(p.relative_to(root)) for p in setting)}\n"
        f"setting sha256 (the setting files, concatenated in that order): {digest}\n")
    pages = generate(root)
    page, line = pages[results / "README.md"], pages[root / "README.md"]
    claim = json.loads((results / "gyro" / "report.json").read_text())["claims"][0]
    assert claim["verdict"] == "held" and claim["test"] == "paired t (by seed)"
    assert "`gyro` > `standard`" in page and "**held**" in page and f"{claim['difference']:+.2f}" in page
    assert f"[{claim['ci_low']:+.2f}, {claim['ci_high']:+.2f}]" in page and "commit 0123456" in page
    assert f"`gyro` > `standard` ({claim['metric']}) held" in line
    assert page.count("has not been run") == 4  # the four other tables
    (root / "conf" / "arm" / f"{rows[0]}.yaml").write_text("# changed\n")
    pages = generate(root)
    assert pages[results / "README.md"].count("has not been run") == 5
    assert "held" not in pages[root / "README.md"]


def test_a_rerun_with_another_setting_keeps_the_earlier_report_in_history(tmp_path):
    """mini_table.sh moves the report of an earlier setting (another sha256 of the
    experiment file and its rows' files in run_info.txt) to history/<date>-<hash>/ before writing the new one,
    and records the commit and the hash. The sweep
    itself is stood in for (its jobs are written here): training is not what is tested."""
    from tests.test_report import config_of, finished_job

    runs, out = tmp_path / "runs", tmp_path / "out"
    for seed in (0, 1):
        finished_job(runs / str(seed), ["dropout=standard", f"seed={seed}"],
                     config_of("standard", 0.5, seed), 0.5 + 0.1 * seed)
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\n[ "$1" = train.py ] && exit 0\n'  # the sweep: done above
                    f'[ "$1" = -c ] && echo "the versions" && exit 0\n'  # no torch import
                    f'exec {sys.executable} "$@"\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub)}

    def run() -> None:
        result = subprocess.run(["bash", str(SCRIPT), "gyro", "--runs", str(runs), "--out",
                                 str(out)], capture_output=True, text=True, cwd=ROOT, env=env)
        assert result.returncode == 0, result.stderr

    run()
    info = (out / "run_info.txt").read_text()
    experiment = CONF / "experiment" / "mini_gyro.yaml"
    rows = yaml.safe_load(experiment.read_text())["hydra"]["sweeper"]["params"]["arm"].split(",")
    setting = [experiment, *(CONF / "arm" / f"{row}.yaml" for row in rows)]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in setting)).hexdigest()
    assert f"sha256 (the setting files, concatenated in that order): {digest}" in info and "git commit: " in info
    assert (out / "report.json").exists() and (out / "seeds.csv").exists()
    # Another setting made the report there: it is kept whole.
    (out / "run_info.txt").write_text(info.replace(digest, "0" * 64))
    earlier = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    run()
    (kept,) = (out / "history").iterdir()
    assert kept.name.endswith("-00000000") and re.match(r"\d{4}-\d\d-\d\d-", kept.name)
    assert {p.name: p.read_bytes() for p in kept.iterdir() if p.is_file()} == earlier
    assert (kept / "figures" / "test_acc.png").exists()
    assert digest in (out / "run_info.txt").read_text()
    assert (out / "report.md").exists()
