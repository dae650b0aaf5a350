"""``python -m apipool_proxy``: the same commands as the ``apipool`` script."""

from .cli import main

raise SystemExit(main())
