"""``python -m iaerf`` = the ``iaerf`` command."""
import sys

from iaerf.longtail.cli import main

sys.exit(main())
