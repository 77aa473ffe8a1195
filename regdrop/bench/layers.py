"""regdrop's drop layers against their peers, on the same inputs, forward and backward.

Peers: ``nn.Dropout`` / ``nn.Dropout2d``, timm's ``DropPath``, torchvision's
``stochastic_depth``, and, when ``composer`` imports (the optional ``bench`` extra),
Composer's ``GyroDropoutLayer`` and its block- and sample-wise stochastic-depth Bottleneck
blocks on the same ResNet-50. A layer case times a training-mode forward and a backward
to the input (and to the head's parameters for multi-sample dropout) with a fixed upstream
gradient; the ResNet-50 case times forward, cross-entropy and backward of the whole
network (no optimizer update).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torchvision.ops import stochastic_depth

from regdrop.bench.report import Comparison
from regdrop.bench.steps import ModelCase
from regdrop.bench.timing import Candidate, measure, say, synchronizer
from regdrop.methods.gyro import GyroDropout
from regdrop.methods.multisample import MultiSampleHead
from regdrop.methods.spatial import SpatialDropout
from regdrop.methods.standard import StandardDropout
from regdrop.methods.stochastic_depth import BranchGate, apply_stochastic_depth


@dataclass(frozen=True)
class LayerSizes:
    """Input sizes of the layer cases and of the ResNet-50 case."""

    batch: int = 256
    gyro_widths: tuple[int, ...] = (1024, 4096)
    tokens: tuple[int, int, int] = (64, 197, 192)  # a ViT-Tiny residual branch output
    conv: tuple[int, int, int, int] = (64, 64, 32, 32)
    # Half width keeps the default run within its 10 minutes on two CPU cores; the blocks
    # are the same torchvision Bottlenecks.
    resnet50_batch: int = 16
    resnet50_width: float = 0.5
    resnet50_image: int = 32


def composer_version() -> str | None:
    """Composer's version when it imports with its algorithms, else None."""
    try:
        import composer
        from composer.algorithms.gyro_dropout import GyroDropoutLayer  # noqa: F401
    except Exception:  # any failure to import means: not available as a peer
        return None
    return composer.__version__


def _composer_missing() -> str:
    try:
        import composer.algorithms  # noqa: F401
    except Exception as err:
        return (f"Composer peers skipped: composer is not importable ({type(err).__name__}: "
                f"{err}); install the bench extra (docs/benchmarks.md)")
    return ""


def layer_step(layer: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
               wrt: Sequence[torch.Tensor]) -> Callable[[], object]:
    """Forward ``layer`` on ``inputs`` and backward to ``wrt`` with a fixed upstream gradient
    (drawn once, so every candidate of a case gets the same one)."""
    grad_out = torch.randn_like(layer(*inputs))

    def run() -> object:
        out = layer(*inputs)
        return torch.autograd.grad(out, wrt, grad_out)

    return run


def network_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor
                 ) -> Callable[[], object]:
    """Forward, cross-entropy and backward of ``model`` (gradients dropped, no update)."""

    def run() -> object:
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    return run


def _features(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.randn(shape, device=device, requires_grad=True)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


@dataclass
class LayerCase:
    case: str
    candidates: list[Candidate]
    pairs: list[tuple[str, str]]


def standard_cases(sizes: LayerSizes, device: torch.device) -> list[LayerCase]:
    cases = []
    for shape in ((sizes.batch, 1024), sizes.tokens):
        x = _features(shape, device)
        ours, peer = StandardDropout(0.5).to(device), nn.Dropout(0.5).to(device)
        cases.append(LayerCase(
            f"standard dropout p=0.5, {_shape(shape)}",
            [Candidate("StandardDropout", layer_step(ours, [x], [x])),
             Candidate("nn.Dropout", layer_step(peer, [x], [x]))],
            [("StandardDropout", "nn.Dropout")]))
    return cases


def spatial_case(sizes: LayerSizes, device: torch.device) -> LayerCase:
    x = _features(sizes.conv, device)
    ours = SpatialDropout(0.1, channel_axis=1).to(device)
    peer = nn.Dropout2d(0.1).to(device)
    return LayerCase(
        f"spatial dropout p=0.1, {_shape(sizes.conv)}",
        [Candidate("SpatialDropout", layer_step(ours, [x], [x])),
         Candidate("nn.Dropout2d", layer_step(peer, [x], [x]))],
        [("SpatialDropout", "nn.Dropout2d")])


def drop_path_case(sizes: LayerSizes, device: torch.device) -> LayerCase:
    x = _features(sizes.tokens, device)
    ours = BranchGate(0.1, mode="sample").to(device)
    timm_path = DropPath(0.1).to(device)

    def torchvision_path(t: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(t, 0.1, mode="row", training=True)

    return LayerCase(
        f"drop path (per sample) p=0.1, {_shape(sizes.tokens)}",
        [Candidate("BranchGate(mode=sample)", layer_step(ours, [x], [x])),
         Candidate("timm DropPath", layer_step(timm_path, [x], [x])),
         Candidate("torchvision stochastic_depth", layer_step(torchvision_path, [x], [x]))],
        [("BranchGate(mode=sample)", "timm DropPath"),
         ("BranchGate(mode=sample)", "torchvision stochastic_depth")])


def gyro_cases(sizes: LayerSizes, device: torch.device, notes: list[str]) -> list[LayerCase]:
    sigma, tau = 256, 16
    cases = []
    composer = composer_version() is not None
    for width in sizes.gyro_widths:
        shape = (sizes.batch, width)
        x = _features(shape, device)
        ours = GyroDropout(0.5, sigma=sigma, tau=tau, width=width, total_steps=10_000).to(device)
        ours.begin_step(0)
        # The floor of any gyro layer: one broadcast multiply by fixed per-sub-batch rows.
        rows = (torch.rand(tau, 1, width, device=device) >= 0.5).float() * 2.0

        def floor(t: torch.Tensor, rows: torch.Tensor = rows) -> torch.Tensor:
            return (t.unflatten(0, (tau, -1)) * rows).flatten(0, 1)

        candidates = [
            Candidate("GyroDropout", layer_step(ours, [x], [x])),
            Candidate("nn.Dropout", layer_step(nn.Dropout(0.5).to(device), [x], [x])),
            Candidate("StandardDropout", layer_step(StandardDropout(0.5).to(device), [x], [x])),
            Candidate("one broadcast multiply", layer_step(floor, [x], [x])),
        ]
        pairs = [("GyroDropout", "nn.Dropout"), ("GyroDropout", "StandardDropout"),
                 ("GyroDropout", "one broadcast multiply")]
        if composer:
            from composer.algorithms.gyro_dropout import GyroDropoutLayer

            try:
                peer = GyroDropoutLayer(iters_per_epoch=1000, max_epoch=10, p=0.5,
                                        sigma=sigma, tau=tau).to(device)
                candidates.append(Candidate("Composer GyroDropoutLayer",
                                            layer_step(peer, [x], [x])))
                pairs.append(("Composer GyroDropoutLayer", "GyroDropout"))
            except Exception as err:  # a peer's failure is a finding, not a reason to stop
                notes.append(f"Composer GyroDropoutLayer fails on {device}: "
                             f"{type(err).__name__}: {err}")
        cases.append(LayerCase(f"gyro dropout p=0.5 sigma={sigma} tau={tau}, {_shape(shape)}",
                               candidates, pairs))
    return cases


def multisample_case(sizes: LayerSizes, device: torch.device, samples: int = 8) -> LayerCase:
    shape = (sizes.batch, 512)
    x = _features(shape, device)
    ours = MultiSampleHead(nn.Linear(512, 10), p=0.5, samples=samples).to(device)
    # The naive form: M dropout + classifier copies sharing the classifier's weights.
    head = copy.deepcopy(ours.head)
    drop = nn.Dropout(0.5)

    def naive(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(drop(t)) for _ in range(samples)])

    return LayerCase(
        f"multi-sample head M={samples}, 512->10, {_shape(shape)}",
        [Candidate("MultiSampleHead (batched)", layer_step(ours, [x], [x, *ours.parameters()])),
         Candidate(f"loop of {samples} Dropout+Linear",
                   layer_step(naive, [x], [x, *head.parameters()]))],
        [("MultiSampleHead (batched)", f"loop of {samples} Dropout+Linear")])


def resnet50_case(sizes: LayerSizes, device: torch.device, seed: int, notes: list[str]
                  ) -> LayerCase:
    """The same ResNet-50 plain, with regdrop's stochastic depth and with Composer's."""
    case = ModelCase("resnet50", 3, sizes.resnet50_image, sizes.resnet50_batch,
                     {"width": sizes.resnet50_width})
    torch.manual_seed(seed)
    plain = case.build().to(device).train()
    images = torch.randn(sizes.resnet50_batch, 3, sizes.resnet50_image, sizes.resnet50_image,
                         device=device)
    labels = torch.randint(0, 10, (sizes.resnet50_batch,), device=device)
    variants = {"no stochastic depth": plain}
    for mode, rate in (("block", 0.5), ("sample", 0.1)):
        model = copy.deepcopy(plain)
        apply_stochastic_depth(model, drop_rate=rate, mode=mode, distribution="linear", seed=seed)
        variants[f"regdrop {mode}"] = model
    pairs = [("regdrop block", "no stochastic depth"), ("regdrop sample", "no stochastic depth")]
    if composer_version() is not None:
        import composer.functional as cf

        for mode, rate in (("block", 0.5), ("sample", 0.1)):
            model = copy.deepcopy(plain)
            cf.apply_stochastic_depth(model, target_layer_name="ResNetBottleneck",
                                      stochastic_method=mode, drop_rate=rate,
                                      drop_distribution="linear")
            model.to(device)
            variants[f"Composer {mode}"] = model
        pairs += [("Composer block", "no stochastic depth"),
                  ("Composer sample", "no stochastic depth"),
                  ("regdrop block", "Composer block"), ("regdrop sample", "Composer sample")]
    candidates = [Candidate(name, network_step(model, images, labels))
                  for name, model in variants.items()]
    width = sizes.resnet50_width
    return LayerCase(
        f"resnet50 (width {width:g}) forward+backward, s.d. block linear 0.5 / sample linear "
        f"0.1, {_shape(images.shape)}", candidates, pairs)


def layer_comparisons(sizes: LayerSizes, device: torch.device, *, repeats: int, warmup: int,
                      min_time_s: float, network_repeats: int, network_min_time_s: float,
                      seed: int = 0, clock: Callable[[], float] = time.perf_counter
                      ) -> tuple[list[Comparison], list[str]]:
    """Every layer case, then the ResNet-50 case; notes name the skipped peers."""
    notes = []
    if composer_version() is None:
        notes.append(_composer_missing())
    builders: list[Callable[[], LayerCase | list[LayerCase]]] = [
        lambda: standard_cases(sizes, device),
        lambda: spatial_case(sizes, device),
        lambda: drop_path_case(sizes, device),
        lambda: gyro_cases(sizes, device, notes),
        lambda: multisample_case(sizes, device),
    ]
    comparisons = []
    sync = synchronizer(device)

    def run(case: LayerCase, count: int, min_time: float) -> None:
        say(f"  layers: {case.case}")
        torch.manual_seed(seed)
        timings = measure(case.candidates, repeats=count, warmup=warmup, min_time_s=min_time,
                          sync=sync, clock=clock)
        comparisons.append(Comparison(
            "layers", case.case,
            {c.name: t for c, t in zip(case.candidates, timings, strict=True)}, case.pairs))

    for build in builders:
        torch.manual_seed(seed)  # the same inputs whatever ran before
        built = build()
        for case in built if isinstance(built, list) else [built]:
            run(case, repeats, min_time_s)
    # Block mode's cost depends on the gates drawn: a measurement of several steps averages
    # over them, so that regdrop's and Composer's blocks (which draw different gates) are
    # compared on their typical step.
    run(resnet50_case(sizes, device, seed, notes), network_repeats, network_min_time_s)
    return comparisons, notes
