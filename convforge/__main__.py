"""``python -m convforge`` is the same as the ``convforge`` command."""

import sys

from convforge.cli import main

sys.exit(main())
