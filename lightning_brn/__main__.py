"""``python -m lightning_brn`` is the ``lightning-brn`` command (see :mod:`lightning_brn.cli`)."""

from lightning_brn.cli import main

if __name__ == "__main__":
    main()
