"""``python -m bsam_optax``: the ``bsam-optax`` command (:mod:`bsam_optax.app.cli`)."""

import sys

from bsam_optax.app.cli import main

sys.exit(main())
