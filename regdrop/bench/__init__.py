"""regdrop's benchmark: ``python -m regdrop.bench`` (docs/benchmarks.md).

It measures, in one process, side by side and interleaved (`regdrop.bench.timing`):

* whole training steps of each method through the trainer's own `regdrop.train.train_step`,
  against the same model with no method and a bare hand-written PyTorch loop
  (`regdrop.bench.steps`);
* regdrop's drop layers against ``nn.Dropout``/``nn.Dropout2d``, timm, torchvision and
  Composer, and stochastic depth on ResNet-50 against Composer's blocks
  (`regdrop.bench.layers`);
* the fraction of an epoch spent waiting for data (`regdrop.bench.data`);
* the early-linear schedule under ``torch.compile`` (`regdrop.bench.compiled`);

and reports medians, ratios and the performance targets (`regdrop.bench.report`).
"""

from regdrop.bench.cli import main

__all__ = ["main"]
