"""Gradient direction variance and error, gradient norms and the distance of the weights
from their initial values (Liu et al., "Dropout Reduces Underfitting", ICML 2023).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from regdrop.diagnostics.preservation import drop_layers, preserved_state

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


Batch = tuple[torch.Tensor, torch.Tensor]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a . b`` accumulated in float64 (a gradient has millions of terms)."""
    return torch.dot(a.reshape(-1).double(), b.reshape(-1).double())


def _distance(dot: torch.Tensor, square_a: torch.Tensor, square_b: torch.Tensor) -> torch.Tensor:
    # sqrt(|a|^2 |b|^2) rather than |a| |b|: for a == b it is exactly |a|^2 (IEEE sqrt of a
    # square), so identical vectors are at distance exactly 0.
    cosine = (dot / torch.sqrt(square_a * square_b)).clamp(-1.0, 1.0)
    return 1.0 - cosine


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` of two tensors taken as flat vectors, as a 0-d float64 tensor.

    0 for parallel vectors (exactly, for identical ones), 1 for orthogonal ones, 2 for
    opposite ones; NaN when either vector is zero (no direction).
    """
    if a.numel() != b.numel():
        raise ValueError(f"cosine_distance needs vectors of one size, got {a.numel()} and {b.numel()}")
    return _distance(_dot(a, b), _dot(a, a), _dot(b, b))


def gradient_direction_variance(grads: Sequence[torch.Tensor]) -> float:
    """Liu et al.'s GDV: the mean cosine distance over all pairs of the ``K >= 2`` gradients."""
    if len(grads) < 2:
        raise ValueError(f"gradient direction variance needs at least 2 gradients, got {len(grads)}")
    squares = [_dot(g, g) for g in grads]
    distances = [
        _distance(_dot(grads[i], grads[j]), squares[i], squares[j])
        for i in range(len(grads)) for j in range(i + 1, len(grads))
    ]
    return float(torch.stack(distances).mean())


def gradient_direction_error(grads: Sequence[torch.Tensor], reference: torch.Tensor) -> float:
    """Liu et al.'s GDE: the mean cosine distance of each gradient to ``reference``
    (the whole-training-set gradient with dropout off)."""
    if len(grads) < 1:
        raise ValueError("gradient direction error needs at least 1 gradient")
    square_ref = _dot(reference, reference)
    distances = [_distance(_dot(g, reference), _dot(g, g), square_ref) for g in grads]
    return float(torch.stack(distances).mean())


def _flat_gradient(model: nn.Module, params: list[nn.Parameter], loss_fn: LossFn, batch: Batch) -> tuple[torch.Tensor, int]:
    device = params[0].device
    x, y = batch[0].to(device), batch[1].to(device)
    loss = loss_fn(model(x).float(), y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([
        (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
        for g, p in zip(grads, params, strict=True)
    ])
    return flat, len(y)


def weight_distance(model: nn.Module, initial: Sequence[torch.Tensor]) -> float:
    """The L2 distance of the trainable parameters of ``model`` from ``initial`` (same order)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != len(initial):
        raise ValueError(f"model has {len(params)} trainable parameters, initial values {len(initial)}")
    total = sum(((p.detach().double() - p0.double()) ** 2).sum() for p, p0 in zip(params, initial, strict=True))
    return float(torch.as_tensor(total).sqrt())


def measure_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Batch],
    reference: Iterable[Batch],
    *,
    initial: Sequence[torch.Tensor] | None = None,
    seed: int | None = None,
) -> dict[str, float]:
    """GDV, GDE and gradient norms of ``model`` (Liu et al. 2023), leaving it as it was.

    ``batches``: the ``K >= 2`` training batches of the mini-batch gradients, taken with the
    model in training mode (drop layers active). ``reference``: batches covering the data of
    the reference gradient (the mean loss over all their samples), taken with the drop
    layers in evaluation mode and the rest (BatchNorm) in training mode. ``loss_fn`` maps
    (logits, labels) to a mean loss (`multisample_loss` handles ``M x B x C`` logits).
    ``initial``: the initial trainable parameters, for ``weight_distance``. ``seed`` seeds
    the dropout masks drawn here. Everything is run under `preserved_state`.

    Returns ``gdv``, ``gde``, ``grad_norm`` (mean over the ``K`` batches), ``reference_grad_norm``
    and, with ``initial``, ``weight_distance``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with preserved_state(model, seed), torch.enable_grad():
        model.train()
        grads = [_flat_gradient(model, params, loss_fn, batch)[0] for batch in batches]
        for layer in drop_layers(model):
            layer.eval()
        total, count = None, 0
        for batch in reference:
            flat, size = _flat_gradient(model, params, loss_fn, batch)
            # Weighted by batch size: the gradient of the mean loss over every sample.
            total = flat.double() * size if total is None else total.add_(flat.double(), alpha=size)
            count += size
    if total is None:
        raise ValueError("measure_gradients needs at least one reference batch")
    reference_grad = total / count
    result = {
        "gdv": gradient_direction_variance(grads),
        "gde": gradient_direction_error(grads, reference_grad),
        "grad_norm": float(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]).mean()),
        "reference_grad_norm": float(torch.linalg.vector_norm(reference_grad)),
    }
    if initial is not None:
        result["weight_distance"] = weight_distance(model, initial)
    return result
