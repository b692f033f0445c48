"""``python -m ggufserve``: the ``ggufserve`` command."""

from ggufserve.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
