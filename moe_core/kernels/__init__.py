"""Triton kernels of the fused-MoE sequence: public wrappers (check → allocate → launch) in
the public modules, ``@triton.jit`` code in the private ``_*.py`` modules."""
