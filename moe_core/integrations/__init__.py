"""Integrations of moe-core with model libraries.

- :mod:`moe_core.integrations.transformers`: ``patch_moe(model)`` runs the MoE blocks of a
  loaded Hugging Face transformers model (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3,
  gpt-oss) through moe-core; ``unpatch_moe(model)`` restores them.

Importing this package imports no model library; each integration imports its library
only when it needs it (``pip install "moe-core[transformers]"``).
"""

from __future__ import annotations

__all__: list[str] = []
