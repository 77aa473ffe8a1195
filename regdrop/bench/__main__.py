"""``python -m regdrop.bench``: see `regdrop.bench.cli`."""

import sys

from regdrop.bench.cli import main

if __name__ == "__main__":  # the ddp section's spawned processes import this module too
    sys.exit(main())
