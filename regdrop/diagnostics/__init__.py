"""Diagnostics of a run: what a dropout method does to training and to the trained model.

Three measurements, all off by default (config group ``diagnostics``, option ``none``):

* **Gradient direction variance and error** (Liu et al., "Dropout Reduces Underfitting",
  ICML 2023). At chosen optimizer steps, the flattened gradients ``g_1 .. g_K`` of the
  training loss on ``K`` random training batches are taken with the drop layers active, as
  in training. GDV is the mean pairwise cosine distance ``1 - cos(g_i, g_j)`` over the
  ``K (K - 1) / 2`` pairs; GDE is the mean cosine distance of each ``g_k`` to the gradient
  of the whole training set (or of a fixed random subset of it, ``reference_batches``)
  taken with the drop layers in evaluation mode (dropout off). Beside them: the mean
  gradient norm over the ``K`` batches, the norm of the reference gradient, and the L2
  distance of the weights from their values when `Diagnostics` was built (the paper's
  "model distance").

  *BatchNorm* stays in training mode (batch statistics) for both the mini-batch and the
  reference gradients: they are then the gradients of the loss the optimizer follows (the
  reference differs only in having dropout off), and a model without dropout gets a GDE
  that measures mini-batch sampling alone. The running statistics those passes update are
  restored afterwards.

* **MC dropout** (Gal & Ghahramani, ICML 2016): the test accuracy and negative
  log-likelihood of the average of the softmax over ``S`` stochastic forward passes with
  the drop layers in training mode and everything else (BatchNorm) in evaluation mode, at
  the drop rate in force. Gyro dropout (Lee et al., MLSys 2022) is deterministic given its
  active masks, so for a model with `GyroDropout` layers the ensemble is its subnetworks
  instead: the ``tau`` active ones, or the ``sigma`` trained most recently (``tau`` per
  period over the last ``sigma // tau`` periods; with one gyro layer and the default
  selection without replacement, after a full cycle, exactly the bank). Each subnetwork
  sees the whole test set.

* **Calibration** (Guo et al., ICML 2017): the expected calibration error over
  ``calibration_bins`` equal-width bins ``((b-1)/n, b/n]`` of top-1 confidence, for the
  deterministic and the MC predictions, and a reliability diagram (PNG) of both.
  ECE is computed here from the per-bin sums that the diagram needs anyway (a few tensor
  lines, streaming over test batches), not with torchmetrics, whose
  ``MulticlassCalibrationError`` returns the number but not the bins: the diagram would
  have to recompute them, and two codes for one value is one too many.

**Measuring changes nothing.** `Diagnostics.measure` and `Diagnostics.evaluate` leave
training exactly as it would have been (same losses, bit for bit, on the CPU): they run
inside `preserved_state`, which restores torch's global random generators (and Python's
and NumPy's), every buffer of the model (BatchNorm statistics, drop layers' selections),
the extra state of every module that has one (the drop layers' own generators), and every
module's training flag; gradients go into separate tensors (`torch.autograd.grad`), never
into ``.grad``; the batches come from a seeded sampler of their own over the training
tensors, not from the training iterator, and their augmentation from a stream of their
own. Their randomness is a function of the run's seed and the step alone.

The package: `regdrop.diagnostics.preservation` (`preserved_state`),
`regdrop.diagnostics.gradients` (GDV, GDE, norms, weight distance),
`regdrop.diagnostics.calibration` (ECE and the reliability diagram),
`regdrop.diagnostics.ensembles` (deterministic and MC predictions) and
`regdrop.diagnostics.runner` (the config section and `Diagnostics`).
"""

from regdrop.diagnostics.calibration import (
    Calibration,
    expected_calibration_error,
    plot_reliability,
)
from regdrop.diagnostics.ensembles import Evaluation, evaluate_predictions, gyro_members
from regdrop.diagnostics.gradients import (
    cosine_distance,
    gradient_direction_error,
    gradient_direction_variance,
    measure_gradients,
    weight_distance,
)
from regdrop.diagnostics.preservation import drop_layers, preserved_state
from regdrop.diagnostics.runner import (
    GYRO_SUBNETWORKS,
    KEYS,
    Diagnostics,
    check_diagnostics,
    train_test_gap,
)

__all__ = [
    "GYRO_SUBNETWORKS", "KEYS", "Calibration", "Diagnostics", "Evaluation", "check_diagnostics", "cosine_distance",
    "drop_layers", "evaluate_predictions", "expected_calibration_error", "gradient_direction_error",
    "gradient_direction_variance", "gyro_members", "measure_gradients", "plot_reliability", "preserved_state",
    "train_test_gap", "weight_distance",
]
