"""The read-only data beside the repo (../shared/data) and the marks that skip a test when it is absent.

Every test reads the data through these names, so that a clone without ../shared skips exactly the tests that
need it (test_data_paths.py holds the other files to that).
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
GLUE_DIR = SHARED_DATA / "glue"
CORPUS_DIR = SHARED_DATA / "corpus"


def _missing(paths) -> list[str]:
    return [str(p) for p in paths if not Path(p).exists()]


def _reason(missing: list[str]) -> str:
    return f"needs {', '.join(missing)} (../shared/data beside the repo)"


def needs(*paths: Path) -> pytest.MarkDecorator:
    """Skip the test (or module, as `pytestmark`) unless every path exists."""
    missing = _missing(paths)
    return pytest.mark.skipif(bool(missing), reason=_reason(missing))


needs_glue = needs(GLUE_DIR)
needs_corpus = needs(CORPUS_DIR)  # also what recipes/smoke.yaml and tiny.yaml train on


def require(*paths: Path) -> None:
    """In a fixture: skip every test that uses it unless every path exists."""
    missing = _missing(paths)
    if missing:
        pytest.skip(_reason(missing))
