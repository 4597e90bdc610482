"""Hook plugins shipped with moe-core; each registers through the ``moe_core.hooks``
entry-point group exactly as a third-party plugin would."""
