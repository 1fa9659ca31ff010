"""``python -m bsam_optax.app``: the ``bsam-optax`` command."""

import sys

from bsam_optax.app.cli import main

sys.exit(main())
