"""Draw every drop-rate schedule side by side into one figure (docs/schedules.png).

    python scripts/plot_schedules.py [--out docs/schedules.png] [--epochs 300] [--cutoff 50]

The curves come from `regdrop.schedules.DropSchedule`, the code the trainer runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from regdrop.plots import plot_schedules
from regdrop.schedules import DropSchedule, epochs_to_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/schedules.png")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--cutoff", type=float, default=50, help="cutoff / warm-up epochs")
    parser.add_argument("--peak", type=float, default=0.1)
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    args = parser.parse_args()
    steps = epochs_to_steps(args.cutoff, args.steps_per_epoch)
    schedules = [
        ("constant", DropSchedule("constant")),
        ("early, constant", DropSchedule("early", "constant", steps)),
        ("early, linear", DropSchedule("early", "linear", steps)),
        ("late", DropSchedule("late", "constant", steps)),
        ("warmup", DropSchedule("warmup", "constant", steps)),
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_schedules(schedules, args.peak, args.epochs * args.steps_per_epoch, args.steps_per_epoch, out,
                   title=f"Drop-rate schedules: peak {args.peak:g}, {args.epochs} epochs, cutoff / warm-up {args.cutoff:g} epochs")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
