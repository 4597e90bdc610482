"""``fake_broken``: a backend whose vendor library is missing; its import fails."""

import moe_core_fake_vendor_runtime  # noqa: F401  (does not exist)
