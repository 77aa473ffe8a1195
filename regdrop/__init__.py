"""regdrop: experiments with dropout-family regularization, configured with Hydra."""

__version__ = "0.1.0"
