"""``python -m chop.cli`` (and ``torchrun … -m chop.cli``): the ``chop`` command."""

import sys

from chop.cli.main import main

sys.exit(main())
