"""``python -m photoscand`` runs the command line."""

import sys

from photoscand.cli import main

sys.exit(main())
