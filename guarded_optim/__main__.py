"""``python -m guarded_optim bench ...`` (the same as the ``guarded-optim`` console script)."""

from .bench.cli import main

raise SystemExit(main())
