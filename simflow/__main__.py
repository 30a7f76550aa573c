"""``python -m simflow`` is the ``simflow`` command."""

import sys

from simflow.cli import main

sys.exit(main())
