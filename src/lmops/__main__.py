"""``python -m lmops``: the ``lmops`` command."""

from lmops.cli import main

if __name__ == "__main__":
    main()
