"""``python -m regdrop.bench``: run the benchmark's sections, print the table of ratios and
the targets, and write ``bench.json`` and ``bench.md`` into the output folder.

Sizes: ``default`` is the documented run (within 10 minutes on a quiet 2-core CPU);
``tiny`` checks that everything runs (seconds; its numbers mean nothing). On a machine
with CUDA, ``--device auto`` (the default) runs there.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from regdrop.bench.layers import LayerSizes, composer_version
from regdrop.bench.report import Results, evaluate_targets, facts_lines, table, targets_table, write
from regdrop.bench.steps import ModelCase
from regdrop.bench.timing import CLOCKS, say
from regdrop.runtime import Runtime

SECTIONS = ("steps", "layers", "data", "compile", "ddp")


@dataclass(frozen=True)
class Size:
    """How big and how often each section measures."""

    repeats: int
    warmup: int
    min_time_s: float  # at least this long per measurement (several units if need be)
    step_cases: tuple[ModelCase, ...]
    layers: LayerSizes
    network_repeats: int  # measurements of the ResNet-50 case
    network_min_time_s: float  # at least this long per ResNet-50 measurement
    fashion_steps: int | None  # None: a whole epoch
    folder: dict = field(default_factory=dict)
    compile_steps: int = 24
    compile_cutoff: int = 16
    compile_backend: str = "inductor"
    compile_case: ModelCase = ModelCase("lenet", 1, 28, 128, {"width": 0.125})
    ddp_case: ModelCase = ModelCase("resnet18", 3, 32, 32, {"width": 0.25})  # per process


SIZES = {
    "default": Size(
        repeats=11, warmup=2, min_time_s=0.1,
        step_cases=(
            ModelCase("lenet", 1, 28, 128, {"width": 0.125}),
            ModelCase("resnet18", 3, 32, 64, {"width": 0.25}),
            ModelCase("vit_tiny", 3, 32, 64, {"depth": 4, "embed_dim": 96}),
            ModelCase("mixer", 3, 32, 64, {"depth": 4, "embed_dim": 128}),
        ),
        layers=LayerSizes(),
        network_repeats=11,
        network_min_time_s=1.0,
        fashion_steps=None,
        folder={"classes": 10, "per_class": 64, "file_size": 64, "image_size": 32, "batch": 64,
                "workers": 2, "width": 0.25},
    ),
    "tiny": Size(
        repeats=3, warmup=1, min_time_s=0.0,
        step_cases=(
            ModelCase("lenet", 1, 28, 16, {"width": 0.125}),
            ModelCase("resnet18", 3, 16, 8, {"width": 0.0625}),
        ),
        layers=LayerSizes(batch=32, gyro_widths=(64,), tokens=(8, 17, 24), conv=(8, 8, 8, 8),
                          resnet50_batch=4, resnet50_width=0.125, resnet50_image=16),
        network_repeats=3,
        network_min_time_s=0.0,
        fashion_steps=8,
        folder={"classes": 2, "per_class": 16, "file_size": 32, "image_size": 16, "batch": 8,
                "workers": 1, "width": 0.0625},
        compile_steps=4, compile_cutoff=3, compile_backend="eager",
        compile_case=ModelCase("lenet", 1, 28, 16, {"width": 0.125}),
        ddp_case=ModelCase("resnet18", 3, 16, 8, {"width": 0.0625}),
    ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m regdrop.bench",
        description="Time regdrop's training steps and drop layers side by side with a bare "
                    "PyTorch loop and the peer libraries; print ratios, write JSON and Markdown.")
    parser.add_argument("--size", choices=sorted(SIZES), default="default",
                        help="default: the documented run; tiny: a quick check that it runs")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (of {', '.join(SECTIONS)})")
    parser.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is steadier on a busy CPU")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (steadier on a "
                             "shared CPU with --threads 1; CPU device only)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="measurements per candidate (default: the size's)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compile section (default: the size's)")
    parser.add_argument("--data-root", type=Path,
                        default=Path(os.environ.get("REGDROP_DATA", "data")),
                        help="where Fashion-MNIST is, or is unpacked to (the trainer's data.root)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: outputs/bench/<date>_<time>)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        parser.error(f"--only: unknown section(s) {unknown}; valid: {', '.join(SECTIONS)}")
    args.sections = sections
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        parser.error(f"--device: unknown device {args.device!r}; valid: auto, cpu, cuda, cuda:N")
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu: CPU time does not count a GPU's work; use --clock wall")
    if args.repeats is not None and args.repeats < 2:
        parser.error("--repeats must be at least 2 (a median and quartiles)")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def cpu_model() -> str:
    """The CPU's model name, as ``lscpu`` shows it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def context(args: argparse.Namespace, device: torch.device, argv: list[str] | None) -> dict:
    import timm
    import torchvision

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU used"
    composer = composer_version()
    return {
        "command": "python -m regdrop.bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_model()}, {os.cpu_count()} CPU cores, {platform.machine()}; "
                   f"device {device} ({where})",
        "software": f"Python {platform.python_version()}, torch {torch.__version__}, "
                    f"torchvision {torchvision.__version__}, timm {timm.__version__}, "
                    f"composer {composer or 'not installed'}",
        "settings": f"size {args.size}, {torch.get_num_threads()} torch thread(s), "
                    f"{args.clock} clock, sections {', '.join(args.sections)}, seed {args.seed}",
        "load_before": "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
    }


def run(args: argparse.Namespace, argv: list[str] | None = None) -> Results:
    """Run the chosen sections; the targets are evaluated on what was measured."""
    size = SIZES[args.size]
    if args.repeats is not None:
        size = replace(size, repeats=args.repeats,
                       network_repeats=max(2, min(size.network_repeats, args.repeats)))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # The trainer's own precision choice: bf16 autocast on CUDA, fp32 on the CPU.
    runtime = Runtime(device, torch.bfloat16 if device.type == "cuda" else None)
    results = Results(context=context(args, device, argv))
    clock = CLOCKS[args.clock]
    started = time.perf_counter()
    if device.type == "cpu":
        results.notes.append("measured on the CPU only; no GPU run was made")
    if "steps" in args.sections:
        from regdrop.bench.steps import step_comparisons

        say("whole steps: " + ", ".join(c.label for c in size.step_cases))
        comparisons, notes = step_comparisons(
            list(size.step_cases), runtime, repeats=size.repeats, warmup=size.warmup,
            min_time_s=size.min_time_s, seed=args.seed, clock=clock)
        results.comparisons += comparisons
        results.notes += notes
    if "layers" in args.sections:
        from regdrop.bench.layers import layer_comparisons

        say("layers against their peers, and ResNet-50")
        comparisons, notes = layer_comparisons(
            size.layers, device, repeats=size.repeats, warmup=size.warmup,
            min_time_s=min(size.min_time_s, 0.05), network_repeats=size.network_repeats,
            network_min_time_s=size.network_min_time_s, seed=args.seed, clock=clock)
        results.comparisons += comparisons
        results.notes += notes
    if "data" in args.sections:
        from regdrop.bench.data import data_facts

        say("waiting for data: Fashion-MNIST in memory, an ImageFolder tree with workers")
        facts, notes = data_facts(runtime, args.data_root, fashion_steps=size.fashion_steps,
                                  folder=size.folder)
        results.facts["data"] = facts
        results.notes += notes
    if "compile" in args.sections:
        from regdrop.bench.compiled import compile_case

        backend = args.compile_backend or size.compile_backend
        say(f"torch.compile ({backend}) under the early-linear schedule")
        facts, comparison = compile_case(
            runtime, backend=backend, steps=size.compile_steps, cutoff=size.compile_cutoff,
            repeats=size.repeats, warmup=size.warmup, min_time_s=size.min_time_s,
            seed=args.seed, case=size.compile_case, clock=clock)
        results.facts["compile"] = facts
        results.comparisons.append(comparison)
    if "ddp" in args.sections and device.type == "cpu":
        from regdrop.bench.ddp import ddp_comparisons

        say("data parallelism: 2 gloo processes, before and after the loop's changes")
        comparisons, notes = ddp_comparisons(size.ddp_case, repeats=size.repeats, warmup=size.warmup,
                                             seed=args.seed)
        results.comparisons += comparisons
        results.notes += notes
    elif "ddp" in args.sections:
        results.notes.append("ddp: measured with gloo on the CPU only; skipped on this device")
    results.context["wall_s"] = time.perf_counter() - started
    results.context["load_after"] = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    results.targets = evaluate_targets(results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run(args, argv)
    out = args.out or Path("outputs/bench") / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    json_path, md_path = write(results, out)
    context = results.context
    print(f"{context['machine']}\n{context['software']}\n{context['settings']}; load average "
          f"{context['load_before']} -> {context['load_after']}; {context['wall_s']:.0f} s\n")
    print(table(results))
    facts = facts_lines(results)
    if facts:
        print("\n" + "\n".join(facts))
    print("\n" + targets_table(results.targets))
    for note in results.notes:
        print(f"note: {note}")
    print(f"\nwrote {json_path} and {md_path}")
    return 0
