"""``python -m harness.report``: the harness-report command."""

import sys

from harness.report import main

sys.exit(main())
