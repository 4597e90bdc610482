"""Test support shipped with moe-core: the float64 oracle, the tolerance table and the
normalised error metric (TESTING.md §1–§2), for our tests and third-party backends."""

from moe_core.testing.oracle import oracle_moe
from moe_core.testing.tolerances import TOLERANCES, assert_close_normalized, normalized_errors, tolerance_for

__all__ = ["oracle_moe", "assert_close_normalized", "normalized_errors", "TOLERANCES", "tolerance_for"]
