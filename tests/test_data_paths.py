"""The tests reach ../shared/data only through tests/_data.py, and each one that does can skip without it.

A clone without ../shared beside it (CI's contract has it) then skips the data tests instead of failing them.
"""

import re
from pathlib import Path

import _data

TESTS = Path(__file__).resolve().parent
# a path to the shared data built from this checkout's location (tmp_path layouts are the tests' own, and
# test_glue_data checks the package's default through the package's own root, glue._REPO_ROOT)
BUILT_HERE = re.compile(r'\b(__file__|REPO|ROOT)\b[^\n]*"shared"\s*/\s*"data"')
DATA_NAMES = re.compile(r"from _data import [^\n]*\b(GLUE_DIR|CORPUS_DIR|SHARED_DATA)\b")
SKIPS = re.compile(r"\b(needs|needs_glue|needs_corpus|require)\b|pytest\.skip|skipif")


def _sources() -> dict[str, str]:
    skip = ("_data.py", Path(__file__).name)
    return {f.name: f.read_text(encoding="utf-8") for f in sorted(TESTS.glob("*.py")) if f.name not in skip}


def test_no_test_builds_its_own_path_to_the_shared_data():
    offenders = {name: m.group(0) for name, src in _sources().items() if (m := BUILT_HERE.search(src))}
    assert not offenders, f"use GLUE_DIR / CORPUS_DIR / SHARED_DATA from tests/_data.py: {offenders}"
    assert BUILT_HERE.search('GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"')


def test_every_module_reading_the_data_can_skip_without_it():
    silent = [name for name, src in _sources().items() if DATA_NAMES.search(src) and not SKIPS.search(src)]
    assert not silent, f"these read ../shared/data with no needs(...) mark or require(...): {silent}"


def test_marks_skip_exactly_when_a_path_is_missing(tmp_path):
    here, gone = tmp_path / "present", tmp_path / "gone"
    here.mkdir()
    assert _data.needs(here).args == (False,)
    mark = _data.needs(here, gone)
    assert mark.args == (True,) and str(gone) in mark.kwargs["reason"] and str(here) not in mark.kwargs["reason"]
    _data.require(here)
    try:
        _data.require(gone)
    except BaseException as e:  # pytest's Skipped derives from BaseException
        assert type(e).__name__ == "Skipped" and str(gone) in str(e)
    else:
        raise AssertionError("require() of a missing path did not skip")
