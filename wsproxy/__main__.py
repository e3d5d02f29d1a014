"""``python -m wsproxy``: the same as the ``wsproxy`` command."""

import sys

from .cli import main

sys.exit(main())
