"""Benchmark regdrop's drop layers against their peers on the same inputs, in one run.

Every case times a training-mode forward + backward (gradients of the input, and of the
parameters where there are any) of regdrop's layer and of each peer, on the same tensors.
Each timing is the median of ``--repeats`` measurements taken after a warm-up; the
candidates of a case are measured interleaved (in a rotating order), so a load change on a
shared machine hits all of them alike. A measurement runs the step enough times to last
about ``MEASURE_S`` seconds and reports the time per step.

On a shared CPU, prefer ``--threads 1``: when other processes keep the cores busy, a
multi-threaded step waits for its descheduled threads, and the timings mostly measure the
scheduler (on this 2-core machine under load, 2 threads ran 3-4x slower than 1).

The table's ratio is peer time / regdrop time: above 1, regdrop is faster. ``spread`` is the
larger of the two interquartile ranges, relative to its median: how much to trust the ratio.

    .venv/bin/python scripts/benchmark_layers.py                    # CPU, all threads
    .venv/bin/python scripts/benchmark_layers.py --device cuda --repeats 50
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers import DropPath
from torch import nn
from torch.utils.benchmark import Timer
from torchvision.models import resnet18
from torchvision.ops import stochastic_depth

from regdrop.methods.gyro import GyroDropout
from regdrop.methods.multisample import MultiSampleHead
from regdrop.methods.spatial import SpatialDropout
from regdrop.methods.standard import StandardDropout
from regdrop.methods.stochastic_depth import BranchGate, apply_stochastic_depth

# Seconds one measurement lasts, at least: layer steps take about a millisecond, so a
# measurement averages many of them; a ResNet step takes a good fraction of a second on the
# CPU, so there a measurement is one step (block mode's cost then varies with the gates
# drawn in that step, and the median over the repeats is the typical step).
MEASURE_S = {"layer": 0.05, "model": 0.0}


@dataclass
class Candidate:
    name: str
    step: Callable[[], object]


@dataclass
class Case:
    title: str
    shape: str
    regdrop: Candidate
    peers: list[Candidate]
    kind: str = "layer"
    notes: list[str] = field(default_factory=list)


@dataclass
class Timing:
    median_s: float
    iqr_s: float

    @property
    def spread(self) -> float:
        return self.iqr_s / self.median_s


def layer_step(layer: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
               wrt: Sequence[torch.Tensor]) -> Callable[[], object]:
    """A forward of ``layer`` on ``inputs`` and a backward to ``wrt`` with a fixed upstream
    gradient (drawn once, so every candidate of a case gets the same one)."""
    grad_out = torch.randn_like(layer(*inputs))

    def step() -> object:
        out = layer(*inputs)
        return torch.autograd.grad(out, wrt, grad_out)

    return step


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor
               ) -> Callable[[], object]:
    """Forward, cross-entropy and backward of ``model`` (no optimizer update)."""

    def step() -> object:
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    return step


def features(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.randn(shape, device=device, requires_grad=True)


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(size) for size in shape)


def standard_cases(device: torch.device) -> list[Case]:
    cases = []
    for shape in ((256, 1024), (64, 197, 192)):
        x = features(shape, device)
        ours = StandardDropout(0.5).to(device)
        peer = nn.Dropout(0.5).to(device)
        cases.append(Case(
            "standard dropout p=0.5", shape_text(shape),
            Candidate("StandardDropout", layer_step(ours, [x], [x])),
            [Candidate("nn.Dropout", layer_step(peer, [x], [x]))],
        ))
    return cases


def spatial_case(device: torch.device) -> Case:
    shape = (64, 64, 32, 32)
    x = features(shape, device)
    ours = SpatialDropout(0.1, channel_axis=1).to(device)
    peer = nn.Dropout2d(0.1).to(device)
    return Case(
        "spatial dropout p=0.1", shape_text(shape),
        Candidate("SpatialDropout", layer_step(ours, [x], [x])),
        [Candidate("nn.Dropout2d", layer_step(peer, [x], [x]))],
    )


def drop_path_case(device: torch.device) -> Case:
    # The output of a ViT-Tiny residual branch: 197 tokens of width 192.
    shape = (64, 197, 192)
    x = features(shape, device)
    ours = BranchGate(0.1, mode="sample").to(device)
    timm_path = DropPath(0.1).to(device)

    def torchvision_path(t: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(t, 0.1, mode="row", training=True)

    return Case(
        "drop path (per sample) p=0.1", shape_text(shape),
        Candidate("BranchGate(mode=sample)", layer_step(ours, [x], [x])),
        [Candidate("timm DropPath", layer_step(timm_path, [x], [x])),
         Candidate("torchvision stochastic_depth(row)", layer_step(torchvision_path, [x], [x]))],
    )


def resnet_case(device: torch.device, seed: int) -> Case:
    torch.manual_seed(seed)
    plain = resnet18(num_classes=10).to(device).train()
    sample = copy.deepcopy(plain)
    apply_stochastic_depth(sample, drop_rate=0.5, mode="sample", seed=seed)
    block = copy.deepcopy(plain)
    apply_stochastic_depth(block, drop_rate=0.5, mode="block", seed=seed)
    images = torch.randn(64, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (64,), device=device)
    return Case(
        "resnet18 train step, s.d. 0.5 linear", "64x3x32x32",
        Candidate("block mode", train_step(block, images, labels)),
        [Candidate("sample mode", train_step(sample, images, labels)),
         Candidate("no stochastic depth", train_step(plain, images, labels))],
        kind="model",
    )


def gyro_case(device: torch.device) -> Case:
    shape = (256, 1024)
    x = features(shape, device)
    ours = GyroDropout(0.5, sigma=256, tau=16, width=shape[1], total_steps=10_000).to(device)
    ours.begin_step(0)
    standard = StandardDropout(0.5).to(device)
    torch_dropout = nn.Dropout(0.5).to(device)
    case = Case(
        "gyro dropout p=0.5 sigma=256 tau=16", shape_text(shape),
        Candidate("GyroDropout", layer_step(ours, [x], [x])),
        [Candidate("regdrop StandardDropout", layer_step(standard, [x], [x])),
         Candidate("nn.Dropout", layer_step(torch_dropout, [x], [x]))],
    )
    try:
        from composer.algorithms.gyro_dropout import GyroDropoutLayer
    except ImportError as err:
        case.notes.append(f"Composer GyroDropoutLayer skipped: composer is not importable ({err})")
        return case
    try:
        composer_layer = GyroDropoutLayer(iters_per_epoch=1000, max_epoch=10, p=0.5,
                                          sigma=256, tau=16).to(device)
        case.peers.append(Candidate("Composer GyroDropoutLayer",
                                    layer_step(composer_layer, [x], [x])))
    except Exception as err:  # a peer's failure is a finding, not a reason to stop
        case.notes.append(f"Composer GyroDropoutLayer skipped: it fails on {device} "
                          f"({type(err).__name__}: {err})")
    return case


def multisample_case(device: torch.device, samples: int = 8) -> Case:
    shape = (256, 512)
    x = features(shape, device)
    ours = MultiSampleHead(nn.Linear(512, 10), p=0.5, samples=samples).to(device)
    # The naive form: M dropout + classifier copies sharing the classifier's weights.
    head = copy.deepcopy(ours.head)
    drop = nn.Dropout(0.5)

    def naive(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(drop(t)) for _ in range(samples)])

    return Case(
        f"multi-sample head M={samples}, 512->10", shape_text(shape),
        Candidate("MultiSampleHead (batched)", layer_step(ours, [x], [x, *ours.parameters()])),
        [Candidate(f"loop of {samples} Dropout+Linear",
                   layer_step(naive, [x], [x, *head.parameters()]))],
    )


def measure(case: Case, repeats: int, warmup: int, threads: int) -> list[Timing]:
    """Median and IQR per candidate (regdrop first), measured interleaved."""
    candidates = [case.regdrop, *case.peers]
    timers = [Timer("step()", globals={"step": c.step}, num_threads=threads) for c in candidates]
    numbers = []
    for candidate, timer in zip(candidates, timers, strict=True):
        for _ in range(warmup):
            candidate.step()
        once = timer.timeit(1).mean
        numbers.append(max(1, math.ceil(MEASURE_S[case.kind] / once)))
    samples: list[list[float]] = [[] for _ in candidates]
    for repeat in range(repeats):
        for offset in range(len(candidates)):
            index = (repeat + offset) % len(candidates)
            samples[index].append(timers[index].timeit(numbers[index]).mean)
    timings = []
    for values in samples:
        quartiles = statistics.quantiles(values, n=4)
        timings.append(Timing(statistics.median(values), quartiles[2] - quartiles[0]))
    return timings


def table(rows: list[tuple[Case, Candidate, Timing, Timing]]) -> str:
    header = ("| case | input | regdrop | peer | regdrop ms | peer ms | peer / regdrop | spread |\n"
              "|---|---|---|---|---:|---:|---:|---:|")
    lines = [header]
    for case, peer, ours, theirs in rows:
        ratio = theirs.median_s / ours.median_s
        spread = max(ours.spread, theirs.spread)
        lines.append(
            f"| {case.title} | {case.shape} | {case.regdrop.name} | {peer.name} "
            f"| {ours.median_s * 1e3:.3f} | {theirs.median_s * 1e3:.3f} | {ratio:.2f}x "
            f"| {spread:.0%} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=15,
                        help="measurements per candidate; the median is reported")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per candidate")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="intra-op CPU threads (default: torch's default here)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.repeats < 2:
        parser.error("--repeats must be at least 2 (median and quartiles)")

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm "
          f"{timm.__version__}; device {where}; {args.threads} thread(s) of "
          f"{os.cpu_count()} cores; {args.repeats} repeats after {args.warmup} warm-up steps")
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

    builders: list[Callable[[], Case | list[Case]]] = [
        lambda: standard_cases(device),
        lambda: spatial_case(device),
        lambda: drop_path_case(device),
        lambda: resnet_case(device, args.seed),
        lambda: gyro_case(device),
        lambda: multisample_case(device),
    ]
    rows = []
    notes = []
    for build in builders:
        torch.manual_seed(args.seed)  # the same inputs whatever ran before
        built = build()
        for case in built if isinstance(built, list) else [built]:
            notes.extend(case.notes)
            ours, *peers = measure(case, args.repeats, args.warmup, args.threads)
            rows.extend((case, peer, ours, theirs)
                        for peer, theirs in zip(case.peers, peers, strict=True))

    print("load average after:  {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print()
    print(table(rows))
    for note in notes:
        print(f"\nnote: {note}")


if __name__ == "__main__":
    main()
