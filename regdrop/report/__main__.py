"""`python -m regdrop.report DIR [DIR ...]`: see `regdrop.report`."""

from regdrop.report import main

raise SystemExit(main())
