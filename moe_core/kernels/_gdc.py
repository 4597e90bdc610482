"""Programmatic dependent launch (PDL, sm_90+) inside our kernels.

A kernel launched with ``launch_pdl=True`` may start while the kernel before it in the
stream is still running; :func:`_pdl_enter` at the top of every kernel of the sequence
makes it wait there (``griddepcontrol.wait``) until that kernel has finished and its
writes are visible, before the first load or store, and then lets the next kernel launch
(``griddepcontrol.launch_dependents``). What overlaps is the launch and the scheduling of
the next grid, not any memory access: a forward computes exactly what it does without PDL.
Because each kernel waits for the one before, which waited for the one before it, every
earlier kernel has finished too. The host side is :func:`moe_core.kernels._launch.pdl_args`.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_GDC = True
except ImportError:        # a Triton without the CUDA extras: PDL is never asked for
    HAS_GDC = False

__all__ = ["HAS_GDC", "_pdl_enter"]


@triton.jit
def _pdl_enter(PDL: tl.constexpr):
    """With ``PDL``: wait for the previous kernel, then allow the next one to launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
