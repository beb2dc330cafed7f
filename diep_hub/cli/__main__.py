"""``python -m diep_hub.cli``: the ``diep-hub`` command."""

import sys

from . import main

sys.exit(main())
