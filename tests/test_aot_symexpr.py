import pytest

from trtllm_sawint4 import symexpr


def test_evaluate():
    shapes = {"query": (7, 32, 128), "block_table": (7, 33)}
    assert symexpr.evaluate("query.shape[0] * 8", shapes) == 56
    assert symexpr.evaluate("cdiv(block_table.shape[1] * 64, 128)", shapes) == 17
    assert symexpr.evaluate("max(query.shape[1] // 8, 1) + query.shape[2] % 5", shapes) == 4 + 3
    assert symexpr.evaluate("3", shapes) == 3


@pytest.mark.parametrize("expr", ["query.shape[0] / 2", "__import__('os')", "query.dtype", "x.shape[0]",
                                  "query.shape[5]", "query.shape[0] ** 2", "foo(1, 2)"])
def test_rejects_anything_else(expr):
    with pytest.raises(ValueError):
        symexpr.evaluate(expr, {"query": (1, 2, 3)})


def test_translate_folds_with_caller_constructors():
    text = symexpr.translate("cdiv(q.shape[0], 4) * 2", leaf=lambda n, i: f"{n}[{i}]", const=str,
                             binop=lambda op, a, b: f"({a} {op} {b})", call=lambda f, a, b: f"{f}({a}, {b})")
    assert text == "(cdiv(q[0], 4) * 2)"
    assert symexpr.inputs_used("cdiv(q.shape[0], k.shape[1]) + 1") == {"q", "k"}
