"""Per-runner CUDA-graph cache: an eager forward at small M replayed from a captured graph.

At M = 1 an eager forward costs several times its GPU time in host-side Python and Triton
launches; a CUDA-graph replay costs one launch. :class:`GraphCache` captures the forward of
:func:`moe_core.sequence.run` once per shape, flags, weights and plan, then serves later calls by
copying the inputs into the graph's static buffers and replaying it. It keeps at most
:data:`MAX_GRAPHS` graphs (least recently used evicted). :class:`moe_core.MoERunner` uses it
when built with ``cuda_graph_max_tokens > 0``.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Hashable

import attrs
import torch

from moe_core import envs, sequence
from moe_core.config import get_override
from moe_core.spec import ExpertWeights, Plan

__all__ = ["MAX_GRAPHS", "GraphCache", "graph_key", "call_signature"]

logger = logging.getLogger(__name__)

#: graphs one :class:`GraphCache` keeps; the least recently used one is dropped beyond this
MAX_GRAPHS = 16

def _tensor_key(t: torch.Tensor | None) -> Hashable:
    # the graph bakes in the pointer; shape, stride and dtype decide the kernels' arguments
    return None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype)


def graph_key(plan: Plan, x: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor, *,
              inplace: bool, no_combine: bool, out: torch.Tensor | None) -> tuple:
    """Everything that decides which kernels a captured forward launches, and on which memory.

    :param plan: the forward's resolved :class:`Plan` (backend, layer and configs by identity/value).
    :param x: [M, H] tokens (shape, dtype, device).
    :param weights: every tensor of it, its quantization scales and zero points included, by
        ``(data_ptr, shape, stride, dtype)``.
    :param topk_ids: [M, k] ids (shape and dtype).
    :returns: a hashable key, starting with ``x.shape``; two calls with equal keys can share one graph.
    """
    q = weights.quant
    return (x.shape, x.dtype, x.device, topk_ids.shape, topk_ids.dtype, inplace, no_combine, out is not None,
            _tensor_key(weights.w1), _tensor_key(weights.w2), _tensor_key(weights.b1), _tensor_key(weights.b2),
            q.scheme, q.per_channel, q.block_shape, q.group_size,
            *(_tensor_key(getattr(q, name)) for name in q.TENSOR_FIELDS),
            # ids are stable: the entry holds the plan, so backend and layer outlive the key
            id(plan.backend), id(plan.layer), tuple(sorted(plan.config.items())),
            tuple(sorted(plan.down_config.items())), plan.fused_activation)


def call_signature(x: torch.Tensor, weights: ExpertWeights, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   *, inplace: bool, no_combine: bool) -> tuple:
    """Everything :func:`moe_core.sequence.prepare` reads from one call, without pointers of
    the per-call inputs: for a runner (one layer, one backend per quantization) two calls with
    equal signatures pass the same checks and resolve the same plan. ``weights`` counts by
    identity (the cache holds the object, so its id is not reused), with the two weight
    pointers as a guard; the environment and ``override_config`` by value.
    """
    return (id(weights), weights.w1.data_ptr(), weights.w2.data_ptr(),
            x.shape, x.stride(), x.dtype, x.device, x.requires_grad,
            topk_weights.shape, topk_weights.stride(), topk_weights.dtype, topk_weights.device,
            topk_ids.shape, topk_ids.stride(), topk_ids.dtype, topk_ids.device,
            inplace, no_combine, envs.forward_state())


@attrs.frozen(eq=False)
class _Graph:
    """One captured forward: the graph, its static inputs and output, and what it points at."""

    graph: torch.cuda.CUDAGraph
    #: held so the weight tensors the graph reads are never freed and their memory reused
    weights: ExpertWeights
    #: held so the backend and layer ids in the key stay unique
    plan: Plan
    x: torch.Tensor                # [M, H] static input (and output, inplace)
    topk_weights: torch.Tensor     # [M, k] fp32
    topk_ids: torch.Tensor         # [M, k] in the caller's id dtype
    result: torch.Tensor           # [M, H], or [M, k, H] with no_combine

    def replay(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
               inplace: bool, out: torch.Tensor | None) -> torch.Tensor:
        """Copy the inputs into the static buffers, replay, and hand out the result: in ``out``,
        in ``x`` (``inplace``), else a fresh copy (the next replay overwrites the static output)."""
        if torch.is_grad_enabled():
            # the plain path's kernels record no autograd; these copies must not either (an
            # input that requires grad would attach the static buffer to its graph)
            with torch.no_grad():
                return self.replay(x, topk_weights, topk_ids, inplace=inplace, out=out)
        # one multi-tensor copy kernel instead of three launches (each ~5-8 µs of host time)
        torch._foreach_copy_([self.x, self.topk_weights, self.topk_ids], [x, topk_weights, topk_ids])
        self.graph.replay()           # on the current stream, on the graph's device
        if out is not None:
            return out.copy_(self.result)
        if inplace:
            return x.copy_(self.result)
        return self.result.clone()


@attrs.define(eq=False)
class GraphCache:
    """Captured forwards of one runner, keyed by :func:`graph_key`, least recently used first out.

    :param max_graphs: graphs kept (default :data:`MAX_GRAPHS`); each holds its static
        buffers, a private memory pool for the forward's intermediates, and strong references
        to the weight tensors it was captured with.

    Not thread-safe, and calls on different streams must be ordered by the caller: the
    static buffers are shared by every replay of a graph.
    """

    max_graphs: int = attrs.field(default=MAX_GRAPHS, validator=[attrs.validators.instance_of(int),
                                                                 attrs.validators.ge(1)])
    _graphs: collections.OrderedDict[tuple, _Graph] = attrs.field(factory=collections.OrderedDict, init=False)
    #: call signature -> (graph key, the weights object whose id the signature holds)
    _known: dict[tuple, tuple[tuple, ExpertWeights]] = attrs.field(factory=dict, init=False)
    #: why capturing failed (then the cache stays off), else None
    failed: str | None = attrs.field(default=None, init=False)

    def __len__(self) -> int:
        return len(self._graphs)

    def token_counts(self) -> list[int]:
        """M of every cached graph, oldest use first."""
        return [key[0][0] for key in self._graphs]

    def clear(self) -> None:
        """Drop every graph (and with it the references to its weights)."""
        self._graphs.clear()
        self._known.clear()

    def replay_known(self, x: torch.Tensor, weights: ExpertWeights, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, *, inplace: bool, no_combine: bool) -> torch.Tensor | None:
        """The fast path of a repeated call: when an earlier call with the same
        :func:`call_signature` was validated and captured, replay its graph without
        :func:`moe_core.sequence.prepare` (which costs more host time than the replay itself at
        M = 1); else None. Never under ``override_config``, whose dict the signature does not hold,
        nor with ``MOE_CORE_DEBUG=1``, which checks the id and weight values of every call.
        """
        if not self._known or get_override() is not None or envs.debug():
            return None      # MOE_CORE_DEBUG checks the values of every call: prepare must run
        try:
            sig = call_signature(x, weights, topk_weights, topk_ids, inplace=inplace, no_combine=no_combine)
        except (AttributeError, TypeError):      # not tensors: prepare names what is wrong
            return None
        known = self._known.get(sig)
        entry = self._graphs.get(known[0]) if known is not None else None
        if entry is None:
            return None
        self._graphs.move_to_end(known[0])
        return entry.replay(x, topk_weights, topk_ids, inplace=inplace, out=None)

    def run(self, plan: Plan, x: torch.Tensor, weights: ExpertWeights, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, *, inplace: bool = False, no_combine: bool = False,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`moe_core.sequence.run` (same arguments, no ``n_valid``), replayed when cached.

        A miss runs the eager forward, whose result is returned, then captures the forward
        into a new graph with its own static buffers (the caller's tensors are not touched).

        :returns: as :func:`moe_core.sequence.run`; never the graph's static output itself.
        """
        key = None if self.failed else graph_key(plan, x, weights, topk_ids, inplace=inplace,
                                                  no_combine=no_combine, out=out)
        entry = self._graphs.get(key)
        if entry is not None:
            self._graphs.move_to_end(key)
            self._remember(key, x, weights, topk_weights, topk_ids, inplace=inplace, no_combine=no_combine, out=out)
            return entry.replay(x, topk_weights, topk_ids, inplace=inplace, out=out)
        result = sequence.run(plan, x, weights, topk_weights, topk_ids, inplace=inplace,
                              no_combine=no_combine, out=out)
        if key is None:
            return result
        try:
            entry = _capture(plan, x, weights, topk_weights, topk_ids, inplace=inplace,
                             no_combine=no_combine, out=out)
        except Exception as exc:  # noqa: BLE001 - the eager result stands; report and stop capturing
            self.failed = f"{type(exc).__name__}: {exc}"
            self.clear()
            logger.warning("CUDA-graph capture of the %r forward failed, so this runner runs eagerly "
                           "from now on: %s", plan.backend.name, self.failed)
            return result
        self._graphs[key] = entry
        self._remember(key, x, weights, topk_weights, topk_ids, inplace=inplace, no_combine=no_combine, out=out)
        if len(self._graphs) > self.max_graphs:
            dropped, _ = self._graphs.popitem(last=False)
            self._forget_dropped()
            logger.debug("graph cache full (%d graphs): dropped the one of M=%d", self.max_graphs, dropped[0][0])
        return result


    def _remember(self, key: tuple, x: torch.Tensor, weights: ExpertWeights, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, *, inplace: bool, no_combine: bool, out: torch.Tensor | None) -> None:
        """Let later calls with this call's signature find ``key`` without ``prepare``
        (not with ``out=``, whose aliasing checks depend on its pointer, nor under ``override_config``)."""
        if out is not None or get_override() is not None:
            return
        sig = call_signature(x, weights, topk_weights, topk_ids, inplace=inplace, no_combine=no_combine)
        self._known[sig] = (key, weights)
        while len(self._known) > 4 * self.max_graphs:   # e.g. a new ExpertWeights wrapper every call
            del self._known[next(iter(self._known))]     # oldest first

    def _forget_dropped(self) -> None:
        """Drop the signatures of graphs no longer held (and the weights objects they keep alive)."""
        self._known = {s: k for s, k in self._known.items() if k[0] in self._graphs}


def _capture(plan: Plan, x: torch.Tensor, weights: ExpertWeights, topk_weights: torch.Tensor,
             topk_ids: torch.Tensor, *, inplace: bool, no_combine: bool, out: torch.Tensor | None) -> _Graph:
    """Capture the forward on fresh static buffers shaped like the call's inputs."""
    # inference_mode(False): static buffers written by later calls must be normal tensors
    # even when the first call ran under torch.inference_mode()
    with torch.inference_mode(False), torch.no_grad(), torch.cuda.device(x.device):
        x_s = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        tw_s = torch.zeros(topk_weights.shape, dtype=topk_weights.dtype, device=x.device)
        ti_s = torch.zeros(topk_ids.shape, dtype=topk_ids.dtype, device=x.device)   # expert 0: valid
        out_s = torch.empty_like(x_s) if out is not None else None

        def forward() -> torch.Tensor:
            return sequence.run(plan, x_s, weights, tw_s, ti_s, inplace=inplace, no_combine=no_combine, out=out_s)

        # warm up on a side stream (torch's recipe): compiles any kernel specialisation the
        # static buffers need that the caller's tensors did not (alignment), outside capture.
        # The stream is passed to the capture too: torch's default capture stream lives on
        # whichever device was current when it was first made, maybe not x's.
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            result = forward()
    return _Graph(graph=graph, weights=weights, plan=plan, x=x_s, topk_weights=tw_s, topk_ids=ti_s, result=result)
