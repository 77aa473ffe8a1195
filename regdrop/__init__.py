"""regdrop: experiments with dropout-family regularization, configured with Hydra."""

# Every dropout method's options are the schema of its conf/dropout file: importing the
# methods registers them with Hydra's ConfigStore, before anything composes the config tree
# (train.py, a SLURM or joblib job, the tests' compose helpers).
from regdrop import methods as _methods  # noqa: F401

__version__ = "0.1.0"
