"""The suite runs as one pytest invocation over tests/ (CI and the README do that). Without
__init__.py files pytest imports each test file by its basename, so two tiers with a file of the
same name fail collection of the whole run, though each tier alone passes."""
import collections
import os

TESTS = os.path.join(os.path.dirname(__file__), "..")


def test_test_file_basenames_are_unique_across_tiers():
    seen = collections.defaultdict(list)
    for root, dirs, files in os.walk(TESTS):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", "data")]
        for f in files:
            if f.startswith("test_") and f.endswith(".py"):
                seen[f].append(os.path.relpath(os.path.join(root, f), TESTS))
    dup = {k: v for k, v in seen.items() if len(v) > 1}
    assert not dup, f"test files sharing a basename: {dup}"
