"""Platform backends shipped with moe-core (``moe_core.backends``); each registers through
the ``moe_core.backends`` entry-point group exactly as a third-party backend would."""
