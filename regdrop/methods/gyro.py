"""Gyro dropout (Lee et al., "Gyro Dropout: Maximizing Ensemble Effect in Neural Network
Training", MLSys 2022).

Plain dropout draws a fresh mask for every sample of every step, so almost every one of
the 2^d subnetworks it samples is trained only once. Gyro dropout fixes a *bank* of
``sigma`` masks per dropout layer before training and trains only those: the run is cut
into periods, each period activates ``tau`` of the masks, and the batch is split into
``tau`` contiguous sub-batches, sub-batch ``k`` using the ``k``-th active mask. Each mask
thus sees about ``total samples / sigma`` samples, enough to become a trained member of
an implicit ensemble. Evaluation is the identity, as for inverted dropout.

The variant implemented here, and how it differs from the authors' TF code and from
Composer's ``GyroDropoutLayer``:

* **Bank as scores.** The bank holds ``sigma x d`` uniform scores drawn once; the mask in
  force is ``scores >= rate``, so each unit is kept with probability ``1 - rate``.
  *What a changing rate means for gyro:* a drop-rate schedule (early/late dropout) moves
  ``rate``, not the bank, so the ``sigma`` subnetworks keep their identities and stay
  nested: at a lower rate each mask keeps a superset of the units it kept at a higher
  rate, and rate 0 keeps everything (the exact identity).
* **Periods count optimizer steps** (`begin_step`), never forward calls, so gradient
  accumulation does not shorten them. Period length follows the authors' rule
  ``max(1, total_steps // max(1, sigma // tau))`` (`gyro_period`); it is set by
  `setup_run` (the trainer calls it) or by the ``total_steps`` argument.
* **Selection without replacement by default.** The authors and Composer draw each
  period's ``tau`` masks independently, so over ``sigma / tau`` periods about
  ``(1 - 1/e)`` ~ 63% of the bank is ever trained. Here the periods walk a random
  permutation of the bank in chunks of ``tau``, so with ``sigma % tau == 0`` every mask
  is trained exactly once every ``sigma // tau`` periods. When ``sigma % tau != 0`` the
  period that reaches the end of a permutation takes its leftover masks and tops up with
  the first masks of a fresh permutation that are not among them (the period still has
  ``tau`` distinct masks); the masks used for the top-up are moved to the front of the
  fresh permutation and count as its first ones, so every mask is still used exactly
  once per permutation. ``with_replacement=True`` gives the authors' behaviour: every
  period draws ``tau`` distinct masks independently of earlier periods.
* **Selection is a function of (seed, period index).** Jumping to a later step replays
  the skipped draws and going back restarts from the seed, so the masks at a step do not
  depend on how `begin_step` was called; everything is drawn from module-owned, seeded
  CPU generators (never the global or a rank-dependent RNG), so all data-parallel ranks
  agree without communication.
* **Any batch and any shape.** Sample ``i`` of a batch of ``B`` uses active mask
  ``floor(i * tau / B)``, so ``B % tau != 0`` and ``B < tau`` work (with ``B < tau`` some
  active masks get no sample this step). The mask is broadcast along ``mask_axis`` only:
  ``-1`` for ``B x F`` features and ``B x T x C`` tokens (one mask per sample, shared by
  its tokens), ``1`` for ``B x C x H x W`` conv maps (whole channels). Masks are built on
  the input's device in its dtype.
* **Scaling.** ``"expected"`` (default, as Composer): survivors times ``1 / (1 - rate)``.
  ``"empirical"`` (authors' TF code): survivors of mask ``k`` times ``d / (units mask k
  keeps)``, so every sub-batch keeps its mean exactly rather than on average.
* **Exact resume.** Bank, active selection, step, period, permutation and generator
  state are all in the ``state_dict``; a lazily sized bank (``width=None``) is resized
  when loaded into a fresh module.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from regdrop.methods.base import (
    DropModule,
    SurgeryReport,
    check_choice,
    check_int,
    check_rate,
    feature_axis,
    find_sites,
    is_int,
    method_defaults,
    normalise_sites,
    not_applicable,
    refuse_reapply,
    replace_module,
)
from regdrop.methods.method import Method, RunFacts
from regdrop.rng import stream_seed

SCALINGS = ("expected", "empirical")
# The seed streams of this module (`regdrop.rng`): a layer's seed, and its bank and selection.
RNG_STREAMS = ("gyro.site", "gyro.bank", "gyro.selection")
# The site kinds gyro fills (the mask covers the site's feature axis); attention
# probabilities are not a layer's features, so gyro does not apply to ``attn`` sites.
GYRO_KINDS = ("fc", "token", "conv")


def gyro_period(total_steps: int, sigma: int, tau: int) -> int:
    """Optimizer steps per selection period: the authors' ``total_steps // (sigma // tau)``.

    Never below 1 (no division by zero when ``total_steps < sigma // tau``).
    """
    return max(1, total_steps // max(1, sigma // tau))


def gyro_masks(
    scores: torch.Tensor, rate: torch.Tensor | float, scaling: str = "expected"
) -> torch.Tensor:
    """Scaled float32 masks from uniform ``scores`` (``k x d``): a unit is kept if score >= rate."""
    check_choice(scaling, "scaling", SCALINGS)
    keep = (scores >= rate).float()
    if scaling == "expected":
        return keep / (1.0 - torch.as_tensor(rate, dtype=torch.float32, device=scores.device))
    kept = keep.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return keep * (keep.shape[-1] / kept)


def gyro_dropout(
    x: torch.Tensor, masks: torch.Tensor, mask_axis: int = -1, shard: tuple[int, int] = (0, 1)
) -> torch.Tensor:
    """Multiply contiguous sub-batches of ``x`` by the rows of ``masks`` (``tau x d``).

    Sample ``i`` of the ``B`` samples uses row ``floor(i * tau / B)``; the row is laid along
    ``mask_axis`` of ``x`` (which must have size ``d``) and broadcast over the other axes.
    The masks are cast to the device and dtype of ``x``. Under data parallelism ``x`` is
    rank ``r``'s slice of a global batch of ``B * W`` samples (``shard = (r, W)``): its sample
    ``i`` is global sample ``r * B + i`` and uses row ``floor((r * B + i) * tau / (B * W))``,
    so the global batch is cut into ``tau`` sub-batches exactly as on one process.
    """
    axis = _batch_free_axis(mask_axis, x.dim())
    tau, width = masks.shape
    if x.shape[axis] != width:
        raise ValueError(
            f"gyro masks have {width} features but the input has {x.shape[axis]} along axis {axis}"
        )
    return _multiply_sub_batches(x, masks.to(device=x.device, dtype=x.dtype), axis, shard)


def _multiply_sub_batches(
    x: torch.Tensor, masks: torch.Tensor, axis: int, shard: tuple[int, int]
) -> torch.Tensor:
    """``x`` times the mask row of each of its samples (see `gyro_dropout`)."""
    multiplier, groups = _sub_batch_multiplier(masks, x.shape[0], x.dim(), axis, shard)
    return _apply_multiplier(x, multiplier, groups)


def _sub_batch_multiplier(
    masks: torch.Tensor, batch: int, ndim: int, axis: int, shard: tuple[int, int]
) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """What ``x`` (``batch`` samples, ``ndim`` axes) is multiplied by, and how ``x`` is
    grouped for it: one broadcast multiply whenever the sub-batches are whole groups of
    samples.

    With ``size = B * W / tau`` samples per sub-batch (the usual ``B % tau == 0`` on one
    process): if ``size`` divides ``B``, ``x`` is viewed as ``B/size x size x ...`` and
    multiplied by its ``B/size`` consecutive rows (``groups = (B/size, size)``); if ``B``
    divides ``size``, the whole slice uses one row. No per-sample mask is built, and the
    backward is one multiply. Otherwise (uneven sub-batches) each sample's row is gathered
    into a ``B x d`` mask (``groups = None`` in both of these cases).
    """
    tau, width = masks.shape
    rank, world_size = shard
    total = batch * world_size
    shape = [1] * ndim
    shape[axis] = width
    if total and total % tau == 0:
        size, first = total // tau, rank * batch
        if batch % size == 0:  # then ``first`` is a multiple of ``size`` too
            start, count = first // size, batch // size
            return masks[start : start + count].view(count, *shape), (count, size)
        if size % batch == 0:  # the slice lies inside one sub-batch
            return masks[first // size].view(shape), None
    which = (torch.arange(batch, device=masks.device) + rank * batch) * tau // total
    return masks[which].view(batch, *shape[1:]), None


def _apply_multiplier(
    x: torch.Tensor, multiplier: torch.Tensor, groups: tuple[int, int] | None
) -> torch.Tensor:
    if groups is None:
        return x * multiplier
    # ``reshape`` is a view of any batch-contiguous input; the product is contiguous.
    return (x.reshape(*groups, *x.shape[1:]) * multiplier).view(x.shape)


def _batch_free_axis(mask_axis: int, ndim: int) -> int:
    if ndim < 2:
        raise ValueError(f"gyro dropout needs a batched input (B x ...), got {ndim} dimension(s)")
    axis = mask_axis + ndim if mask_axis < 0 else mask_axis
    if not 0 < axis < ndim:
        raise ValueError(f"mask_axis {mask_axis} is not a feature axis of a {ndim}-D input")
    return axis


def _check_hyper_parameters(p: float, sigma: int, tau: int, scaling: str) -> None:
    check_rate(p, "p")
    check_int(sigma, "sigma", positive=True)
    if not is_int(tau) or not 1 <= tau <= sigma:
        raise ValueError(f"tau must be a positive integer <= sigma ({sigma}), got {tau!r}")
    check_choice(scaling, "scaling", SCALINGS)


# The authors' recommendation for LeNet/AlexNet-like nets; a model may declare its own in
# ``regdrop_method_defaults["gyro"]`` (the ResNets: (1024, 8), the paper's for ResNet-18).
DEFAULT_SIGMA, DEFAULT_TAU = 256, 16


@dataclass
class GyroOptions:
    """The options of gyro dropout (the keys of ``conf/dropout/gyro.yaml``)."""

    p: float = 0.5
    sigma: int | None = None  # null: the model's recommendation, else DEFAULT_SIGMA
    tau: int | None = None  # null: the model's recommendation, else DEFAULT_TAU
    sites: list[str] = field(default_factory=lambda: ["fc"])
    with_replacement: bool = False
    scaling: str = "expected"
    seed: int | None = None  # null: the run's seed (0 in the functional API)


def check(options: GyroOptions) -> tuple[str, ...]:
    """Raise `ValueError` (starting with the option's name) for a bad option; needs no model
    (``sigma``/``tau`` None: the model's recommendation, checked once known). Returns the
    site kinds."""
    sigma, tau = options.sigma, options.tau
    check_rate(options.p, "p")
    if sigma is not None:
        check_int(sigma, "sigma", positive=True)
    if tau is not None:
        limit = f" <= sigma ({sigma})" if sigma is not None else ""
        if not is_int(tau) or tau < 1 or (sigma is not None and tau > sigma):
            raise ValueError(f"tau must be a positive integer{limit}, got {tau!r}")
    if not isinstance(options.with_replacement, bool):
        raise ValueError(f"with_replacement must be true or false, got {options.with_replacement!r}")
    check_choice(options.scaling, "scaling", SCALINGS)
    if options.seed is not None:
        check_int(options.seed, "seed")
    return normalise_sites(
        options.sites, valid=GYRO_KINDS,
        why="gyro masks a layer's features, and attention probabilities are not features",
    )


def check_run_length(options: Mapping[str, Any], facts: RunFacts) -> list[str]:
    """Gyro's rules that the run decides: ``tau`` sub-batches must fit the batch; warnings
    when ``sigma`` is not a multiple of ``tau`` or the run is shorter than the bank's
    ``sigma / tau`` periods. ``options`` are those the surgery used (sigma, tau known)."""
    sigma, tau, batch = options["sigma"], options["tau"], facts.batch_size
    if tau > batch:
        raise ValueError(f"tau: {tau} sub-batches do not fit a batch of {batch} (data.batch_size): "
                         f"{tau - batch} active masks would get no sample; use tau <= {batch}")
    notes = []
    if sigma % tau:
        notes.append(f"gyro sigma={sigma} is not a multiple of tau={tau}: periods straddle two "
                        "permutations of the bank (see docs/methods.md)")
    if facts.total_steps is not None and facts.total_steps < sigma // tau:
        notes.append(f"gyro: {facts.total_steps} steps are fewer than sigma/tau = {sigma // tau} "
                        "periods: part of the bank is never trained")
    return notes


def _check_total_steps(total_steps: int | None) -> None:
    if total_steps is not None:
        check_int(total_steps, "total_steps", positive=True)


class GyroDropout(DropModule):
    """Gyro dropout (Lee et al., MLSys 2022): ``sigma`` fixed masks, ``tau`` active per period.

    See the module docstring for the exact variant. The trainer calls `setup_run` once and
    `begin_step` before every optimizer step; without the trainer pass ``total_steps`` and
    call ``layer.begin_step(step)`` yourself (for every `GyroDropout` of the model) before
    each optimizer step's forward passes.

    Args:
        p: peak drop rate; the rate in force (``self.rate``) may be moved by a schedule.
        sigma: number of masks in the bank.
        tau: masks active in one period (= sub-batches per batch).
        mask_axis: the input axis the mask covers (-1 for ``B x F`` / ``B x T x C``, 1 for
            ``B x C x H x W``).
        with_replacement: draw each period's masks independently of earlier periods (the
            authors' and Composer's behaviour) instead of walking a permutation of the bank.
        scaling: ``"expected"`` (1 / (1 - rate)) or ``"empirical"`` (1 / kept fraction of
            each mask).
        seed: seed of the module's generators; equal seeds give equal banks and selections.
        width: size of ``mask_axis``; if None the bank is drawn at the first training forward.
        total_steps: optimizer steps of the run, to set the period without `setup_run`.
    """

    scores: torch.Tensor
    selection: torch.Tensor

    def __init__(
        self,
        p: float = 0.5,
        sigma: int = 256,
        tau: int = 16,
        mask_axis: int = -1,
        *,
        with_replacement: bool = False,
        scaling: str = "expected",
        seed: int = 0,
        width: int | None = None,
        total_steps: int | None = None,
    ) -> None:
        _check_hyper_parameters(p, sigma, tau, scaling)
        if not is_int(mask_axis) or mask_axis == 0:
            raise ValueError(
                f"mask_axis must be a non-batch axis (-1 or 1, say), got {mask_axis!r}"
            )
        if width is not None:
            check_int(width, "width", positive=True)
        check_int(seed, "seed")
        _check_total_steps(total_steps)
        super().__init__(p)
        self.sigma = operator.index(sigma)
        self.tau = operator.index(tau)
        self.mask_axis = operator.index(mask_axis)
        self.with_replacement = bool(with_replacement)
        self.scaling = scaling
        self.seed = operator.index(seed)
        self.width = None if width is None else operator.index(width)
        self.total_steps: int | None = None
        self.period: int | None = None
        self.shard = (0, 1)  # (rank, world size): see setup_run

        # The bank and the selections come from separate streams, so the selections do not
        # depend on whether the bank was drawn before or after the first `begin_step`.
        self._selection_generator = torch.Generator(device="cpu")
        self.register_buffer("scores", torch.empty(0, 0))
        self.register_buffer("selection", torch.zeros(tau, dtype=torch.long))
        self._reset_selection()
        self._step: int | None = None  # the step of the last begin_step, None before any
        self._ready = False  # bank drawn, period known, a step begun: see forward
        # The last eager training forward's multiplier and its key: `_cached_multiplier`.
        self._mask_cache: tuple | None = None
        if width is not None:
            self._draw_bank(width, torch.device("cpu"))
        if total_steps is not None:
            self.setup_run(total_steps)

    # -- the bank --------------------------------------------------------------------

    def _draw_bank(self, width: int, device: torch.device) -> None:
        generator = torch.Generator(device="cpu").manual_seed(stream_seed(self.seed, "gyro.bank"))
        scores = torch.rand(self.sigma, width, generator=generator)
        self.scores = scores.to(device)
        self.width = width

    def masks(self, which: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled float32 masks at the rate in force: the active ones, or bank rows ``which``."""
        if self.scores.numel() == 0:
            raise RuntimeError(
                "GyroDropout has no bank yet: pass width= or run a training forward first"
            )
        rows = self.selection if which is None else which
        return gyro_masks(self.scores[rows.to(self.scores.device)], self.rate, self.scaling)

    # -- periods and selection ---------------------------------------------------------

    def setup_run(self, total_steps: int, rank: int = 0, world_size: int = 1) -> None:
        """Set the period from the run's length (the authors' rule, see `gyro_period`), and
        this process's place among ``world_size`` data-parallel ranks (`gyro_dropout`)."""
        _check_total_steps(total_steps)
        self.shard = (rank, world_size)
        self.total_steps = operator.index(total_steps)
        self.period = gyro_period(self.total_steps, self.sigma, self.tau)
        if self._step is not None:
            self._select_period(self._step // self.period)

    def begin_step(self, step: int) -> None:
        """Make the masks of optimizer step ``step`` active (new ones at period boundaries)."""
        if not is_int(step) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        period = self._require_period()
        step = operator.index(step)
        self._step = step
        self._select_period(step // period)

    def _require_period(self) -> int:
        if self.period is None:
            raise RuntimeError(
                "GyroDropout does not know the length of the run: call setup_run(total_steps) "
                "(the regdrop trainer does) or pass total_steps= to GyroDropout / "
                "apply_gyro_dropout before training"
            )
        return self.period

    def _reset_selection(self) -> None:
        self._selection_generator.manual_seed(stream_seed(self.seed, "gyro.selection"))
        self._permutation = torch.arange(self.sigma)
        self._position = self.sigma  # exhausted: the first selection draws a permutation
        self._period_index = -1

    def _select_period(self, index: int) -> None:
        """Advance (replaying skipped periods) or restart the selection stream to ``index``."""
        if index < self._period_index:
            self._reset_selection()
        chosen = None
        while self._period_index < index:
            chosen = self._next_selection()
            self._period_index += 1
        if chosen is not None:
            self.selection.copy_(chosen)

    def _next_selection(self) -> torch.Tensor:
        generator = self._selection_generator
        if self.with_replacement:
            return torch.randperm(self.sigma, generator=generator)[: self.tau]
        end = self._position + self.tau
        if end <= self.sigma:
            self._position = end
            return self._permutation[end - self.tau : end].clone()
        leftover = self._permutation[self._position :]
        fresh = torch.randperm(self.sigma, generator=generator)
        in_leftover = torch.zeros(self.sigma, dtype=torch.bool)
        in_leftover[leftover] = True
        top_up = fresh[~in_leftover[fresh]][: self.tau - len(leftover)]
        in_top_up = torch.zeros(self.sigma, dtype=torch.bool)
        in_top_up[top_up] = True
        self._permutation = torch.cat([top_up, fresh[~in_top_up[fresh]]])
        self._position = len(top_up)
        return torch.cat([leftover, top_up])

    # -- forward -----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        # One bool guards the first-forward work, so torch.compile does not specialise on
        # the step or the period (integer attributes) and recompile every step.
        if not self._ready:
            self._prepare(x)
        if torch.compiler.is_compiling():
            # Traced: the masks come from the rate tensor inside the graph (no recompiles).
            return gyro_dropout(x, self.masks(), self.mask_axis, self.shard)
        multiplier, groups = self._cached_multiplier(x)
        return _apply_multiplier(x, multiplier, groups)

    def _cached_multiplier(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """The active masks at the rate in force, scaled, in ``x``'s dtype and device, laid
        out for ``x``'s batch (`_sub_batch_multiplier`).

        They change only when the rate, the selection or the bank does, so eager forwards
        reuse them: the key holds those buffers' version counters (bumped by every in-place
        change: `set_rate_factor`, a new selection, ``load_state_dict``) and the buffers
        themselves (``.to(device)`` and a redrawn bank make new ones), with the batch size,
        rank, dtype and device of ``x``.
        """
        buffers = self._buffers  # not the attributes: nn.Module.__getattr__ costs per call
        rate, selection, scores = buffers["rate"], buffers["selection"], buffers["scores"]
        try:
            key = (x.shape[0], x.dim(), x.dtype, x.device, self.shard, self.scaling,
                   rate._version, selection._version, scores._version)
        except RuntimeError:  # inference-mode tensors carry no version counter
            key = None
        cached = self._mask_cache
        if (key is not None and cached is not None and cached[0] == key and cached[1] is rate
                and cached[2] is selection and cached[3] is scores):
            axis, multiplier, groups = cached[4:]
        else:
            axis = _batch_free_axis(self.mask_axis, x.dim())
            with torch.no_grad():
                masks = self.masks().to(device=x.device, dtype=x.dtype)
            multiplier, groups = _sub_batch_multiplier(masks, x.shape[0], x.dim(), axis,
                                                       self.shard)
            if key is not None:
                self._mask_cache = (key, rate, selection, scores, axis, multiplier, groups)
        if x.shape[axis] != self.width:
            raise ValueError(
                f"gyro masks have {self.width} features but the input has {x.shape[axis]} "
                f"along axis {axis}"
            )
        return multiplier, groups

    def _prepare(self, x: torch.Tensor) -> None:
        """First training forward: check the period, draw a lazy bank, select period 0."""
        self._require_period()
        width = x.shape[_batch_free_axis(self.mask_axis, x.dim())]
        if self.scores.numel() == 0:
            self._draw_bank(width, self.rate.device)
        elif width != self.width:
            raise ValueError(
                f"GyroDropout was built for {self.width} features along axis {self.mask_axis}, "
                f"got input of shape {tuple(x.shape)}"
            )
        if self._step is None:
            warnings.warn(
                "GyroDropout.begin_step was never called: training on period 0's masks only. "
                "Call begin_step(step) before each optimizer step (the regdrop trainer does).",
                stacklevel=3,
            )
            self._step = 0
            self._select_period(0)
        self._ready = True

    # -- state ---------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "width": self.width,
            "total_steps": self.total_steps,
            "period": self.period,
            "step": self._step,
            "period_index": self._period_index,
            "permutation": self._permutation.clone(),
            "position": self._position,
            "generator": self._selection_generator.get_state(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # The saved run is the truth: its seed restarts the selection stream on a step back.
        self.seed = state["seed"]
        self.width = state["width"]
        self.total_steps = state["total_steps"]
        self.period = state["period"]
        self._step = state["step"]
        self._period_index = state["period_index"]
        self._permutation = state["permutation"].clone().cpu()
        self._position = state["position"]
        self._selection_generator.set_state(state["generator"].cpu())
        self._ready = False

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # A lazily sized bank may be drawn in one module and not yet in the other: the saved
        # shape wins (an empty bank is redrawn from the saved seed at the next forward).
        incoming = state_dict.get(prefix + "scores")
        if incoming is not None and (self.scores.numel() == 0) != (incoming.numel() == 0):
            self.scores = torch.empty(incoming.shape, device=self.scores.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"{self.rate_repr()}, sigma={self.sigma}, tau={self.tau}, mask_axis={self.mask_axis}, "
            f"with_replacement={self.with_replacement}, scaling={self.scaling!r}, "
            f"seed={self.seed}, width={self.width}, period={self.period}"
        )


def apply_gyro_dropout(model: nn.Module, *, total_steps: int | None = None, **options: Any
                       ) -> SurgeryReport:
    """Put a `GyroDropout` at every drop site of the given kinds; return what was replaced
    (`GyroOptions`: ``p=0.5, sigma=None, tau=None, sites=("fc",), with_replacement=False,
    scaling="expected", seed=0``).

    ``fc`` and ``token`` sites get masks over the last axis, ``conv`` sites over channels.
    Site ``i`` (in module order) is seeded with ``stream_seed(seed, "gyro.site", i)``, so layers draw
    different banks while every data-parallel rank draws the same ones. A model that
    already has gyro dropout is refused (`refuse_reapply`).
    ``sigma``/``tau`` None take the model's recommendation (``regdrop_method_defaults``:
    the paper's (1024, 8) for the ResNets), else the paper's (256, 16) for LeNet/AlexNet.
    ``total_steps`` (the run's length) may be given now or later through ``setup_run``.
    """
    chosen = GyroOptions(**options)
    kinds = check(chosen)
    _check_total_steps(total_steps)
    p, sigma, tau, scaling = chosen.p, chosen.sigma, chosen.tau, chosen.scaling
    with_replacement, seed = chosen.with_replacement, chosen.seed or 0
    recommended = method_defaults(model, "gyro")
    report = SurgeryReport("gyro")
    if sigma is None or tau is None:
        source = f"{type(model).__name__}'s recommendation" if recommended else "the LeNet/AlexNet default"
        report.notes.append(f"sigma, tau unset: {source}")
    sigma = recommended.get("sigma", DEFAULT_SIGMA) if sigma is None else sigma
    tau = recommended.get("tau", DEFAULT_TAU) if tau is None else tau
    _check_hyper_parameters(p, sigma, tau, scaling)
    refuse_reapply(model, GyroDropout, "apply_gyro_dropout")
    report.options.update(sigma=sigma, tau=tau)
    found = find_sites(model, kinds)
    if not found:
        raise not_applicable("apply_gyro_dropout", model, kinds)
    for index, (name, site) in enumerate(found):
        layer = GyroDropout(
            p,
            sigma,
            tau,
            feature_axis(site),
            with_replacement=with_replacement,
            scaling=scaling,
            seed=stream_seed(seed, "gyro.site", index),
            total_steps=total_steps,
        )
        replace_module(model, name, layer)
        report.add(name, site, layer)
    return report


# Which subnetworks an MC-dropout ensemble of a gyro model averages over.
SUBNETWORKS = ("tau", "sigma")


def subnetworks(model: nn.Module, which: str = "tau") -> list[list[int]]:
    """The subnetworks of a model's `GyroDropout` layers: one bank index per layer each.

    ``tau``: the active masks (subnetwork ``k`` uses row ``k`` of every layer's selection, as
    sub-batch ``k`` does in training). ``sigma``: those of the last ``sigma // tau`` periods up
    to the current one, replayed on copies of the layers (the model is not touched).
    """
    layers = [m for m in model.modules() if isinstance(m, GyroDropout)]
    if not layers:
        raise ValueError("the model has no GyroDropout layer")
    if which not in SUBNETWORKS:
        raise ValueError(f"which must be one of {list(SUBNETWORKS)}, got {which!r}")
    if which == "tau":
        selections = [[layer.selection.tolist() for layer in layers]]
    else:
        state = layers[0].get_extra_state()
        if state["step"] is None or state["period"] is None:
            raise ValueError("the gyro layers have not begun a training step: no period to replay")
        current = state["step"] // state["period"]
        periods = range(max(0, current - max(1, layers[0].sigma // layers[0].tau) + 1), current + 1)
        selections = []
        replicas = [copy.deepcopy(layer) for layer in layers]
        for period in periods:
            for replica in replicas:
                replica.begin_step(period * replica.period)
            selections.append([replica.selection.tolist() for replica in replicas])
    members = []
    for per_layer in selections:
        members.extend([list(indices) for indices in zip(*per_layer, strict=False)])
    return members


METHOD = Method("gyro", GyroOptions, apply_gyro_dropout, check, recommendable=frozenset({"sigma", "tau"}),
                run_length=check_run_length, ensemble=subnetworks)
