"""``python -m torchdkm``: the command line (see :mod:`torchdkm.cli`)."""

from .cli import main

raise SystemExit(main())
