"""The benchmark (`python -m regdrop.bench`) runs at its tiny size and writes what it says.

Timings are never asserted (the machine is shared); what is checked is that every section
runs, that the JSON and Markdown hold the comparisons, ratios and targets, and that the
whole-step candidates are real `regdrop.train.train_step` calls.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import regdrop.train
from regdrop.bench.cli import SECTIONS, main
from regdrop.bench.steps import ModelCase, step_comparisons
from regdrop.bench.timing import Candidate, measure
from regdrop.methods.gyro import GyroDropout
from regdrop.runtime import Runtime
from tests.conftest import FASHION_MNIST_INSTALLED


def test_tiny_run_writes_json_and_markdown_with_every_section(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["--size", "tiny", "--threads", "1", "--clock", "cpu", "--device", "cpu", "--out", str(out),
                 "--data-root", str(tmp_path / "data")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "bench.json").read_text())
    markdown = (out / "bench.md").read_text()

    sections = {c["section"] for c in report["comparisons"]}
    assert sections == {"steps", "layers", "compile"}
    steps = [c for c in report["comparisons"] if c["section"] == "steps"]
    assert [c["case"].split(" ")[0] for c in steps] == ["lenet", "resnet18"]
    resnet = next(c for c in steps if c["case"].startswith("resnet18"))
    # Every method that applies to a ResNet is there, beside the bare loop and no method.
    assert {"bare loop", "none", "standard", "gyro", "multisample M=8", "s.d. block",
            "s.d. sample"} <= set(resnet["timings"])
    for comparison in report["comparisons"]:
        for name, timing in comparison["timings"].items():
            assert len(timing["samples_ms"]) >= 3, name
            assert timing["median_ms"] > 0 and timing["number"] >= 1
    for row in report["ratios"]:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert row["ratio"] == pytest.approx(row["candidate_ms"] / row["reference_ms"])
    # The ResNet-50 case compares regdrop's stochastic depth with the plain network.
    assert any(r["case"].startswith("resnet50") and r["candidate"] == "regdrop block"
               for r in report["ratios"])

    compile_facts = report["facts"]["compile"]
    assert compile_facts["steps"] == len(compile_facts["graphs_per_step"]) == 4
    assert compile_facts["factors"][0] == 1.0 and compile_facts["factors"][-1] == 0.0
    assert compile_facts["graphs"] >= 1
    folder = report["facts"]["data"]["image_folder"]
    assert 0 <= folder["wait_fraction"] <= 1 and folder["steps"] == 4
    if FASHION_MNIST_INSTALLED:
        fashion = report["facts"]["data"]["fashion_mnist"]
        assert fashion["steps"] == 8 and 0 <= fashion["wait_fraction"] <= 1

    names = [t["name"] for t in report["targets"]]
    assert any(n.startswith("framework overhead") for n in names)
    assert any("torch.compile" in n for n in names)
    assert report["context"]["command"].startswith("python -m regdrop.bench --size tiny")
    assert "1 torch thread(s), cpu clock" in report["context"]["settings"]
    assert "no GPU run was made" in " ".join(report["notes"])

    for text in (markdown, printed):
        assert "| steps | lenet" in text and "| none | bare loop |" in text
        assert "| target | measured | limit | verdict |" in text
    assert "torch " + torch.__version__ in markdown


def test_whole_steps_go_through_the_trainers_train_step(monkeypatch):
    calls = []
    real = regdrop.train.train_step

    def counted(parts, batches, step, factor):
        calls.append((parts.model, step))
        return real(parts, batches, step, factor)

    monkeypatch.setattr(regdrop.train, "train_step", counted)
    case = ModelCase("lenet", 1, 28, 8, {"width": 0.125})
    methods = (("gyro", "gyro", {"sigma": 8, "tau": 2}),)
    repeats, warmup = 3, 2
    (comparison,), notes = step_comparisons([case], Runtime(torch.device("cpu"), None),
                                            repeats=repeats, warmup=warmup, min_time_s=0.0,
                                            methods=methods)
    assert notes == []
    assert list(comparison.timings) == ["bare loop", "none", "gyro"]
    models = list(dict.fromkeys(model for model, _ in calls))
    assert len(models) == 2  # "none" and "gyro"; the bare loop never calls train_step
    for model, name in zip(models, ["none", "gyro"], strict=True):
        steps = [step for m, step in calls if m is model]
        number = comparison.timings[name].number
        # Warm-up, one timed unit to size the measurements, then the measurements.
        assert steps == list(range(warmup + 1 + repeats * number))
    # The gyro layer was stepped by train_step (its begin_step), not left at step 0.
    gyro = [m for m in models[1].modules() if isinstance(m, GyroDropout)]
    assert gyro and all(layer._step == len(steps) - 1 for layer in gyro)


def test_measure_interleaves_candidates_in_a_rotating_order():
    order = []
    candidates = [Candidate(name, lambda name=name: order.append(name)) for name in "abc"]
    timings = measure(candidates, repeats=3, warmup=1, min_time_s=0.0)
    assert [t.number for t in timings] == [1, 1, 1]
    assert order[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up and sizing, per candidate
    assert order[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_bad_arguments_are_refused(capsys):
    for argv in (["--only", "steps,nothing"], ["--repeats", "1"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2
    assert ", ".join(SECTIONS) in capsys.readouterr().err
