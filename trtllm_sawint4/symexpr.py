"""Integer expressions over input shapes, as TensorRT's AOT plugins need them.

A TensorRT AOT plugin gives its grid and its integer kernel arguments as symbolic expressions of
the input shapes. The manifest stores them as small strings, e.g. "cdiv(query.shape[0], 4) * 8",
which this module checks and evaluates (the launcher, tests) and which `plugins/` turns into
`trtp` symbolic expressions. Allowed: integer literals, `NAME.shape[i]`, + - * // %, cdiv, min, max.
"""

from __future__ import annotations

import ast
from typing import Callable, Mapping, Sequence

_BINOPS: dict[type, Callable[[int, int], int]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}
_FUNCS: dict[str, Callable[[int, int], int]] = {
    "cdiv": lambda a, b: -(-a // b),
    "min": min,
    "max": max,
}


def _shape_ref(node: ast.AST) -> tuple[str, int] | None:
    """`NAME.shape[i]` -> (NAME, i)."""
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "shape"
            and isinstance(node.value.value, ast.Name) and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, int)):
        return node.value.value.id, node.slice.value
    return None


def _walk(node: ast.AST, leaf: Callable[[str, int], object], const: Callable[[int], object],
          binop: Callable[[type, object, object], object], call: Callable[[str, object, object], object]):
    if isinstance(node, ast.Expression):
        return _walk(node.body, leaf, const, binop, call)
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return const(node.value)
    ref = _shape_ref(node)
    if ref is not None:
        return leaf(*ref)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return binop(type(node.op), _walk(node.left, leaf, const, binop, call),
                     _walk(node.right, leaf, const, binop, call))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and len(node.args) == 2 and not node.keywords):
        return call(node.func.id, *(_walk(a, leaf, const, binop, call) for a in node.args))
    raise ValueError(f"unsupported shape expression element: {ast.dump(node)}")


def parse(expr: str) -> ast.Expression:
    try:
        return ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"shape expression {expr!r} is not valid: {e.msg}") from None


def inputs_used(expr: str) -> set[str]:
    names: set[str] = set()
    _walk(parse(expr), lambda n, i: names.add(n), lambda c: None, lambda op, a, b: None,
          lambda f, a, b: None)
    return names


def evaluate(expr: str, shapes: Mapping[str, Sequence[int]]) -> int:
    """Value of `expr` for concrete input shapes {name: shape}."""

    def leaf(name: str, i: int) -> int:
        if name not in shapes:
            raise ValueError(f"shape expression {expr!r} names input {name!r}, not among {sorted(shapes)}")
        if not -len(shapes[name]) <= i < len(shapes[name]):
            raise ValueError(f"shape expression {expr!r}: {name} has rank {len(shapes[name])}")
        return int(shapes[name][i])

    return int(_walk(parse(expr), leaf, int, lambda op, a, b: _BINOPS[op](a, b), lambda f, a, b: _FUNCS[f](a, b)))


def translate(expr: str, leaf: Callable[[str, int], object], const: Callable[[int], object],
              binop: Callable[[str, object, object], object], call: Callable[[str, object, object], object]):
    """Fold `expr` with caller-given constructors (e.g. TensorRT's symbolic ints).

    binop receives '+', '-', '*', '//' or '%'."""
    names = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%"}
    return _walk(parse(expr), leaf, const, lambda op, a, b: binop(names[op], a, b), call)
