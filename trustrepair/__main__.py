"""``python -m trustrepair``: the command line (:mod:`trustrepair.app.cli`)."""
from trustrepair.app.cli import main

raise SystemExit(main())
