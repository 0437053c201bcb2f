"""``python -m kd.report``: see :mod:`kd.report`."""

import sys

from kd.report.cli import main

sys.exit(main())
