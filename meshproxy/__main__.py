"""``python -m meshproxy``: the same as the ``meshproxy`` command."""

import sys

from meshproxy.cli import main

sys.exit(main())
