"""``python -m lightning_tda.cli``: the ``lightning-tda`` command."""

import sys

from lightning_tda.cli import main

sys.exit(main())
