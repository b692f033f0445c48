"""``python -m ggufserve``: the ``ggufserve`` command."""

from ggufserve.cli.main import main

raise SystemExit(main())
