"""The exit codes of every photoscand command (the README and ``--help`` list them)."""

from __future__ import annotations

OK = 0
FAILED_IMAGES = 1  # `scan`: an image under the watched folders failed; `run`: a forced stop
NOTHING_DONE = 1  # `retry`: a path with no image under it (a typo), or no catalog
USAGE = 2  # a usage, configuration or catalog error
LOCKED = 3  # another photoscand holds the catalog
