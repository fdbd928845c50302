"""photoscand: catalogs photos into SQLite as they land, then makes thumbnails."""

__version__ = "0.1.0"
