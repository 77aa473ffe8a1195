"""``python -m regdrop.bench``: see `regdrop.bench.cli`."""

import sys

from regdrop.bench.cli import main

sys.exit(main())
