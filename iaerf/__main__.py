"""``python -m iaerf`` = the ``iaerf`` command."""
import sys

from iaerf.cli import main

sys.exit(main())
