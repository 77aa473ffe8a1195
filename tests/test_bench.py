"""The benchmark (`python -m regdrop.bench`) runs at its tiny size and writes what it says.

Timings are never asserted (the machine is shared); what is checked is that every section
runs, that the JSON and Markdown hold the comparisons, ratios and targets, that the
whole-step candidates are real `regdrop.train.train_step` calls, and (with a fake clock)
that a target's verdict follows the interval of its paired ratios, not its point value.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import regdrop.train
from regdrop.bench.cli import SECTIONS, main
from regdrop.bench.report import Comparison, Results, Target
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
    assert sections == {"steps", "layers", "compile", "ddp"}
    # Data parallelism, 2 gloo processes: each change before and after, against one process.
    ddp = {c["case"].split(";")[0]: c for c in report["comparisons"] if c["section"] == "ddp"}
    assert set(ddp) == {"no method: DDP step, stop flag", "block-wise stochastic depth (linear 0.5): data parallelism"}
    for comparison in ddp.values():
        assert "one process" in comparison["timings"] and len(comparison["timings"]) == 3
        assert any(t.startswith("before") for t in comparison["timings"])
        assert any(t.startswith("after") for t in comparison["timings"])
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
        low, high = row["paired_interval"]
        assert low <= row["paired_ratio"] <= high
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
    assert {t["verdict"] for t in report["targets"]} <= {"met", "missed", "unresolved", "not measured"}
    assert all(t["interval"] is not None for t in report["targets"]
               if t["name"].startswith("framework") and t["measured"] is not None)
    assert any(n.startswith("framework overhead") for n in names)
    assert any("torch.compile" in n for n in names)
    assert report["context"]["command"].startswith("python -m regdrop.bench --size tiny")
    assert "1 torch thread(s), cpu clock" in report["context"]["settings"]
    assert "no GPU run was made" in " ".join(report["notes"])

    for text in (markdown, printed):
        assert "| steps | lenet" in text and "| none | bare loop |" in text
        assert "| target | measured [95% interval] | limit | verdict |" in text
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


class FakeClock:
    """A clock that only the candidates move: each unit of work adds its set duration."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, durations: list[float]):
        """A unit of work whose k-th call takes ``durations[k % len]`` seconds."""
        calls = iter(range(10**6))
        return lambda: setattr(self, "now", self.now + durations[next(calls) % len(durations)])


def timed_target(candidate_s: list[float], reference_s: list[float], limit: float, at_most: bool = True) -> Target:
    """The target a benchmark run makes of a candidate and a reference timed with these
    per-call durations (11 rounds, interleaved, through `measure`)."""
    clock = FakeClock()
    candidates = [Candidate("candidate", clock.work(candidate_s)), Candidate("reference", clock.work(reference_s))]
    timings = measure(candidates, repeats=11, warmup=0, min_time_s=0.0, clock=clock)
    results = Results(comparisons=[Comparison("steps", "case", dict(zip(["candidate", "reference"], timings, strict=True)),
                                              [("candidate", "reference")])])
    return Target("t", **results.paired("steps", "case", "candidate", "reference"), limit=limit, at_most=at_most)


# Per-call durations: the first call sizes the measurement, the next 11 are the rounds.
STEADY = [1.0] * 12
NOISY = [1.0, 0.7, 1.3, 0.8, 1.2, 0.75, 1.25, 0.9, 1.1, 0.85, 1.15, 1.0]  # +-30% around 1


@pytest.mark.parametrize("candidate_s, limit, at_most, verdict", [
    ([0.9 * d for d in STEADY], 1.03, True, "met"),            # 0.9, wholly below 1.03
    ([1.1 * d for d in STEADY], 1.03, True, "missed"),         # 1.1, wholly above
    (NOISY, 1.03, True, "unresolved"),                         # median 1.0, interval over 1.03
    ([2.5 * d for d in STEADY], 2.0, False, "met"),            # an at-least target
    (NOISY, 0.95, False, "unresolved"),
    ([0.5 * d for d in STEADY], 0.85, False, "missed"),
])
def test_a_timed_target_is_decided_by_the_interval_of_its_paired_ratios(candidate_s, limit, at_most, verdict):
    target = timed_target(candidate_s, STEADY, limit, at_most)
    low, high = target.interval
    assert low <= target.measured <= high
    assert target.verdict() == verdict, (target.measured, target.interval)
    assert target.met is {"met": True, "missed": False}.get(verdict)


def test_the_point_value_alone_does_not_decide_a_noisy_target():
    """The median ratio of the noisy candidate is below the limit (met by the point value),
    but its interval reaches above it: unresolved, and the JSON and Markdown say so."""
    target = timed_target(NOISY, STEADY, 1.05)
    assert target.measured <= 1.05 < target.interval[1]
    assert target.verdict() == "unresolved"
    row = target.as_dict()
    assert row["verdict"] == "unresolved" and row["met"] is None and row["interval"] == list(target.interval)
    from regdrop.bench.report import targets_table

    line = targets_table([target]).splitlines()[-1]
    assert f"[{target.interval[0]:.3f}, {target.interval[1]:.3f}]" in line and line.endswith("| unresolved |")


def test_every_figure_on_the_benchmarks_page_is_in_a_committed_bench_report():
    # docs/benchmarks.md quotes figures only from bench.md files committed under docs/bench/.
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    figures = docs.joinpath("benchmarks.md").read_text().split("## Figures", 1)[1]
    reports = " ".join(p.read_text() for p in sorted(docs.glob("bench/*/bench.md")))
    quoted = re.findall(r"\d+\.\d{3}", figures)
    assert quoted, "the Figures section quotes no ratio"
    assert [q for q in quoted if q not in reports] == []
    for link in re.findall(r"\]\((bench/[^)]+)\)", figures):
        assert (docs / link).is_file(), link


def test_a_method_added_to_the_registry_is_benchmarked_with_no_edit_of_the_benchmark(monkeypatch):
    from regdrop.bench.steps import registered_methods
    from regdrop.methods import REGISTRY
    from regdrop.methods.method import Method
    from regdrop.methods.standard import StandardOptions, apply_standard_dropout, check

    dummy = Method("dummy", StandardOptions, apply_standard_dropout, check)
    monkeypatch.setitem(REGISTRY, "dummy", dummy)
    assert ("dummy", "dummy", {}) in registered_methods()
    case = ModelCase("lenet", 1, 28, 8, {"width": 0.125})
    (comparison,), _ = step_comparisons([case], Runtime(torch.device("cpu"), None), repeats=2, warmup=1,
                                        min_time_s=0.0)
    assert "dummy" in comparison.timings and ("dummy", "none") in comparison.pairs
    assert comparison.timings["dummy"].median_s > 0
