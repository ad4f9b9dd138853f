"""tests/mutants.py, the opt-in mutation check, still fits the code: every planted bug's original text occurs exactly
once in its file (else it plants nothing and reads as missed, or is silently dropped), and every test it names for a
file exists. A refactor that changes a line a mutant plants in fails here, in seconds, not an hour later.

    python -m pytest -q tests/test_7_mutants.py
"""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import mutants  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_every_mutant_plants_its_bug_once():
    stale = [(i, path, old[:60]) for i, (path, old, new) in enumerate(mutants.MUTANTS)
             if (REPO / path).read_text().count(old) != 1 or old == new]
    assert not stale, f"mutants whose original text is not in the code exactly once: {stale}"


def test_every_named_test_exists():
    # a file's own tests, or DEFAULT_TESTS (train.py's) for a file TESTS does not list
    named = [t for tests in [*mutants.TESTS.values(), mutants.DEFAULT_TESTS] for t in tests]
    for test in named:
        path, _, name = test.partition("::")
        assert (REPO / path).is_file(), test
        assert not name or re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), test
