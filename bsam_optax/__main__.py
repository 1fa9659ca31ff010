"""``python -m bsam_optax``: the ``bsam-optax`` command."""

import sys

from bsam_optax._cli import main

sys.exit(main())
