"""The run folder's one contract (regdrop/runfolder.py): the failed-jobs record written and
read by the same code, one list of keys outside a result for the identity and the report,
and the file names and statuses spelled only there."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import open_dict

import regdrop
from regdrop.identity import config_hash
from regdrop.report.runs import failed_jobs, ignored_key, result_overrides
from regdrop.runfolder import (
    FAILED_JOBS,
    OUTSIDE_RESULT,
    RESULT_FILES,
    RunStatus,
    read_failed_jobs,
    record_failed_job,
)
from tests.conftest import TINY, compose_config


def test_a_failed_job_is_read_back_as_written_spaces_and_parentheses_included(tmp_path):
    overrides = ["dropout=gyro", "seed=1", "+tags=[a b]", "data.root=/x (copy)"]
    written = record_failed_job(tmp_path, 3, overrides, "regdrop: error in dropout.tau:\nmust be > 0")
    records, unreadable = read_failed_jobs(tmp_path)
    assert records == [written] and unreadable == 0
    assert written.overrides == overrides and "\n" not in written.message
    assert json.loads((tmp_path / FAILED_JOBS).read_text())["job"] == 3


def test_an_older_plain_text_record_is_still_read_and_a_torn_line_counted(tmp_path):
    (tmp_path / FAILED_JOBS).write_text(
        "1796013105.472 job 3 (dropout=gyro seed=1): error in dropout.tau: got 0\n"
        '{"time": 1796013106.0, "job": 4, "overrides": ["seed=2"], "message": "error in seed"}\n'
        '{"time": 17960\n')
    records, unreadable = read_failed_jobs(tmp_path)
    assert [(r.job, r.overrides, r.message) for r in records] == [
        ("3", ["dropout=gyro", "seed=1"], "error in dropout.tau: got 0"), (4, ["seed=2"], "error in seed")]
    assert unreadable == 1
    assert failed_jobs(tmp_path) == [({"dropout": "gyro", "seed": "1"}, "error in dropout.tau: got 0"),
                                     ({"seed": "2"}, "error in seed")]


@pytest.mark.parametrize("key", OUTSIDE_RESULT)
def test_a_key_outside_a_result_splits_no_cell_and_the_seed_is_averaged_not_dropped(key):
    assert ignored_key(key) and ignored_key(f"{key}.x") and ignored_key(f"+{key}")
    assert result_overrides({key: "1", "seed": "2", "dropout.p": "0.3"}) == {"seed": "2", "dropout.p": "0.3"}
    assert ignored_key("seed") and not ignored_key("dropout.p")


@pytest.mark.parametrize("override", ["trainer.log_every=3", "trainer.threads=1", "trainer.keep_best=true",
                                      "trainer.compile_backend=eager", "data.eval_batch_size=8", "task_name=x"])
def test_the_identity_ignores_the_keys_the_report_ignores(override, tmp_path):
    key = override.partition("=")[0]
    assert ignored_key(key)
    base = config_hash(compose_config(TINY, tmp_path))
    assert config_hash(compose_config([*TINY, override], tmp_path)) == base
    assert config_hash(compose_config([*TINY, "dropout.p=0.25"], tmp_path)) != base


def test_paths_outside_a_result_do_not_move_the_identity(tmp_path):
    cfg = compose_config(TINY, tmp_path / "a")
    other = compose_config(TINY, tmp_path / "b")
    with open_dict(other):
        other.data.root = str(tmp_path / "elsewhere")
    assert config_hash(cfg) == config_hash(other)


# The literals of the contract, and the modules that may spell them (the contract itself).
CONTRACT = Path(regdrop.__file__).parent / "runfolder.py"
SPELLED = [*RESULT_FILES[:-2], "failed_jobs.txt", *(status.value for status in RunStatus)]


def test_file_names_and_statuses_are_spelled_only_in_the_contract():
    words = "|".join(re.escape(f'"{word}"') for word in SPELLED)
    pattern = re.compile(f"(?:{words})(?!\\s*:)")  # a dict's key (a wandb summary's name) is not one
    spelled = [f"{path.relative_to(CONTRACT.parent)}:{number}: {line.strip()}"
               for path in sorted(CONTRACT.parent.rglob("*.py")) if path != CONTRACT
               for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert spelled == []
