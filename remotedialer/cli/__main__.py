"""``python -m remotedialer.cli``: the ``remotedialer`` command."""

import sys

from . import main

sys.exit(main())
