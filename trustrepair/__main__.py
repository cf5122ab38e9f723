"""``python -m trustrepair ...``: the same command line as the ``trustrepair`` script."""
from .cli import main

raise SystemExit(main())
