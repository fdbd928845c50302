"""Shared test fixtures: where the photo corpus lives and what its manifest says."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The team's corpus sits beside the repository (../shared/corpus); PHOTOSCAND_TEST_CORPUS
# points elsewhere when a checkout lives somewhere else.
CORPUS = Path(os.environ.get("PHOTOSCAND_TEST_CORPUS", REPO.parent / "shared" / "corpus"))


def load_manifest() -> list[dict[str, str]]:
    """Every row of the corpus's MANIFEST.csv (exiftool's reading of each file)."""
    with open(CORPUS / "MANIFEST.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The read-only photo corpus; tests that write copy from it into tmp_path."""
    if not (CORPUS / "MANIFEST.csv").is_file():
        pytest.fail(f"photo corpus not found at {CORPUS} (set PHOTOSCAND_TEST_CORPUS)")
    return CORPUS


@pytest.fixture(scope="session")
def manifest(corpus_dir: Path) -> list[dict[str, str]]:
    """MANIFEST.csv rows, one per corpus file."""
    return load_manifest()
