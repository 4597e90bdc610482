"""Tier I: static guards on the Triton kernel sources (``moe_core/kernels/_*.py``).

Read with ``ast`` (no Triton import), every ``@triton.jit`` function is checked for:

- element offsets built from program ids (``offs = pid * BLOCK + tl.arange(...)``) that
  reach a pointer (``x_ptr + offs``) or a stride product without an int64 cast, and
  program-id values multiplied by a stride without one (block indices used as plain
  indices, ``expert_ids_ptr + pid_m``, are fine);
- slot / token / expert values loaded from the alignment metadata (``sorted_token_ids``,
  ``expert_ids``, ``topk_ids``) used in a stride product without an int64 cast;
- a hard-coded ``tl.bfloat16`` (generic kernels take the dtype from the pointer).

Failures name ``file:line``. A planted bad kernel proves each rule can fail.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

KERNEL_DIR = Path(__file__).resolve().parents[1] / "moe_core" / "kernels"
METADATA = re.compile(r"sorted_token_ids|expert_ids|topk_ids|token_ids")


def _is_jit(fn: ast.FunctionDef) -> bool:
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute) and target.attr in ("jit", "autotune", "heuristics"):
            return True
    return False


def _is_int64_cast(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "to"
            and bool(node.args) and isinstance(node.args[0], ast.Attribute) and node.args[0].attr == "int64")


def _is_call_to(node: ast.AST, attr: str) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr


def _uncast(node: ast.AST):
    """Yield the nodes of ``node``'s subtree that are not under a ``.to(tl.int64)`` cast."""
    if _is_int64_cast(node):
        return
    yield node
    for child in ast.iter_child_nodes(node):
        yield from _uncast(child)


class _Checker(ast.NodeVisitor):
    """Taint analysis of one jit function, in source order."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.narrow: set[str] = set()      # program-id derived names that are NOT int64
        self.narrow_elem: set[str] = set() # ... of them, element offsets (built with tl.arange)
        self.wide: set[str] = set()        # program-id derived names that are int64
        self.meta_narrow: set[str] = set() # metadata-loaded names without an int64 cast
        self.errors: list[str] = []

    def _err(self, node: ast.AST, msg: str) -> None:
        self.errors.append(f"{self.path}:{node.lineno}: {msg}")

    def _uncast_names(self, node: ast.AST, pool: set[str]) -> set[str]:
        return {n.id for n in _uncast(node) if isinstance(n, ast.Name) and n.id in pool}

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        value = node.value
        targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        has_pid = any(_is_call_to(n, "program_id") for n in _uncast(value))
        narrow_used = self._uncast_names(value, self.narrow)
        any_pid = any(_is_call_to(n, "program_id") for n in ast.walk(value)) or \
            any(isinstance(n, ast.Name) and n.id in (self.narrow | self.wide) for n in ast.walk(value))
        has_arange = any(_is_call_to(n, "arange") for n in ast.walk(value))
        loads_meta = any(_is_call_to(n, "load") and n.args and METADATA.search(ast.unparse(n.args[0]))
                         for n in ast.walk(value))
        for t in targets:
            for pool in (self.narrow, self.narrow_elem, self.wide, self.meta_narrow):
                pool.discard(t)
            if any_pid:
                is_narrow = (has_pid or narrow_used) and not _is_int64_cast(value)
                (self.narrow if is_narrow else self.wide).add(t)
                if is_narrow and (has_arange or self._uncast_names(value, self.narrow_elem)):
                    self.narrow_elem.add(t)
            if loads_meta and not _is_int64_cast(value):
                self.meta_narrow.add(t)

    def visit_BinOp(self, node: ast.BinOp) -> None:
        self.generic_visit(node)
        if isinstance(node.op, ast.Add):
            for side, other in ((node.left, node.right), (node.right, node.left)):
                if isinstance(side, ast.Name) and side.id.endswith("_ptr"):
                    bad = self._uncast_names(other, self.narrow_elem)
                    if bad:
                        self._err(node, f"pointer offset {sorted(bad)} built from program ids without "
                                        ".to(tl.int64)")
            return
        if not isinstance(node.op, ast.Mult):
            return
        for side, other in ((node.left, node.right), (node.right, node.left)):
            if isinstance(side, ast.Name) and side.id.startswith("stride"):
                bad = self._uncast_names(other, self.narrow | self.meta_narrow)
                if any(_is_call_to(n, "program_id") for n in _uncast(other)):
                    bad.add("tl.program_id")
                if bad:
                    self._err(node, f"stride product with {sorted(bad)} not cast to int64")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.generic_visit(node)
        if node.attr == "bfloat16" and isinstance(node.value, ast.Name) and node.value.id == "tl":
            self._err(node, "hard-coded tl.bfloat16 in a generic kernel (take the dtype from the pointer)")


def check_source(source: str, path: str) -> list[str]:
    """Every guard violation of the jit functions in ``source``, as ``path:line: message``."""
    errors: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and _is_jit(node):
            checker = _Checker(path)
            for stmt in node.body:
                checker.visit(stmt)
            errors += checker.errors
    return errors


def _kernel_files() -> list[Path]:
    return sorted(p for p in KERNEL_DIR.glob("_*.py") if p.name != "__init__.py")


def test_kernel_sources_exist() -> None:
    names = {p.name for p in _kernel_files()}
    assert {"_align.py", "_act.py", "_sum.py", "_quantize.py"} <= names, names


@pytest.mark.parametrize("path", _kernel_files(), ids=lambda p: p.name)
def test_kernel_offsets_int64_and_no_bf16(path: Path) -> None:
    errors = check_source(path.read_text(), str(path.relative_to(KERNEL_DIR.parents[1])))
    assert not errors, "kernel guard violations:\n" + "\n".join(errors)


BAD = '''
import triton
import triton.language as tl

@triton.jit
def bad_pid(x_ptr, stride_xm, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + rows, rows)

@triton.jit
def bad_stride(x_ptr, stride_xm):
    pid = tl.program_id(0)
    tl.store(x_ptr + pid * stride_xm, 0)

@triton.jit
def bad_meta(sorted_token_ids_ptr, out_ptr, stride_om, BLOCK: tl.constexpr):
    offs_token = tl.load(sorted_token_ids_ptr + tl.arange(0, BLOCK))
    tl.store(out_ptr + offs_token * stride_om, 0)

@triton.jit
def fine_block_index(expert_ids_ptr, x_ptr, stride_xm, BLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    e = tl.load(expert_ids_ptr + pid_m)
    offs_r = pid_m * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs_r.to(tl.int64) * stride_xm, e)

@triton.jit
def bad_bf16(x_ptr):
    tl.store(x_ptr, tl.zeros([16], dtype=tl.bfloat16))

@triton.jit
def good(sorted_token_ids_ptr, out_ptr, stride_om, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    offs_token = tl.load(sorted_token_ids_ptr + offs).to(tl.int64)
    tl.store(out_ptr + offs_token * stride_om, 0)
'''


def test_guards_catch_planted_bugs() -> None:
    errors = check_source(BAD, "planted.py")
    lines = {int(e.split(":")[1]) for e in errors}
    assert lines == {9, 14, 19, 30}, errors
    assert all(e.startswith("planted.py:") for e in errors)
