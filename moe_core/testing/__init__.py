"""Test support shipped with moe-core: the float64 oracle, the tolerance table and the
normalised error metric (TESTING.md §1–§2), for our tests and third-party backends."""

import sys as _sys

# The conformance suite's asserts are rewritten by pytest (readable failures) when it is
# imported under pytest; without pytest nothing is imported here.
if "pytest" in _sys.modules:
    _sys.modules["pytest"].register_assert_rewrite("moe_core.testing.conformance")

from moe_core.testing.oracle import oracle_moe  # noqa: E402
from moe_core.testing.tolerances import TOLERANCES, assert_close_normalized, normalized_errors, tolerance_for  # noqa: E402

__all__ = ["oracle_moe", "assert_close_normalized", "normalized_errors", "TOLERANCES", "tolerance_for"]
