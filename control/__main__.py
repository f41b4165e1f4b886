"""``python -m control``: the same as ``meshproxy-control``."""

import sys

from control.cli import main

sys.exit(main())
