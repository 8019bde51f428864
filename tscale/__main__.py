"""``python -m tscale …``: the ``tscale`` command."""

import sys

from tscale.cli import main

sys.exit(main())
