"""``python -m stream ...`` runs the CLI (the same as the ``stream`` console script)."""

import os
import sys

from stream.tools.cli import main

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
