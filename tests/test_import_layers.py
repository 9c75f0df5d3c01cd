"""Layers import one way (spec -> reference -> kernels -> torch ops -> cache -> integrations -> plugins ->
CLI/deploy), with no circle, and imports that cross a mapped folder are absolute (tests/import_layers.py
says how the graph is read). `python tests/import_layers.py` prints the graph."""

from __future__ import annotations

import textwrap

import import_layers as il


def test_the_package_imports_one_way():
    graph = il.build()
    assert len(graph.files) > 40 and graph.edges  # the walk found the package, the mapped folders included
    assert "trtllm_sawint4.kernels.decode" in graph.files and "trtllm_sawint4.plugins.aot" in graph.files
    found = il.problems(graph)
    assert not found, "\n".join(found)


def test_the_check_finds_upward_edges_circles_unplaced_modules_and_relative_crossings(tmp_path, monkeypatch):
    """A small tree with the package-dir mapping and one of each mistake: the check must name them all."""
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent("""
        [tool.setuptools.package-dir]
        "trtllm_sawint4" = "trtllm_sawint4"
        "trtllm_sawint4.kernels" = "kernels"
    """))
    files = {
        "trtllm_sawint4/__init__.py": "",
        "trtllm_sawint4/spec.py": "from .cache import X\n",  # spec -> cache: upward
        "trtllm_sawint4/cache.py": "def f():\n    from trtllm_sawint4.kernels import decode\n",
        "trtllm_sawint4/allocator.py": "from trtllm_sawint4 import cache\n",  # same layer: fine
        "trtllm_sawint4/ops/__init__.py": "",
        "trtllm_sawint4/ops/dispatch.py": "from trtllm_sawint4 import kernels\n",
        "trtllm_sawint4/mystery.py": "",  # no layer
        "kernels/__init__.py": "from ..ops.dispatch import register\n",  # upward, relative across, circle
        "kernels/decode.py": "from trtllm_sawint4.spec import X\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(il, "ROOT", tmp_path)
    graph = il.build(tmp_path)
    assert set(graph.files) == {"trtllm_sawint4", "trtllm_sawint4.spec", "trtllm_sawint4.cache",
                                "trtllm_sawint4.allocator", "trtllm_sawint4.ops", "trtllm_sawint4.ops.dispatch",
                                "trtllm_sawint4.mystery", "trtllm_sawint4.kernels", "trtllm_sawint4.kernels.decode"}
    found = il.problems(graph)
    text = "\n".join(found)
    assert "trtllm_sawint4.mystery: no layer" in text
    assert "upward: trtllm_sawint4.spec (spec) imports trtllm_sawint4.cache (cache)" in text
    assert "upward: trtllm_sawint4.kernels (kernels) imports trtllm_sawint4.ops.dispatch (torch ops)" in text
    assert "relative import across a mapped folder: trtllm_sawint4.kernels -> trtllm_sawint4.ops.dispatch" in text
    assert "circle: trtllm_sawint4.kernels -> trtllm_sawint4.ops.dispatch" in text
    assert "circle: trtllm_sawint4.cache -> trtllm_sawint4.kernels.decode -> trtllm_sawint4.spec" in text
    # the lazy import inside cache.f counts as an edge (cache -> kernels is downward: no problem)
    assert graph.targets("trtllm_sawint4.cache") == ["trtllm_sawint4.kernels.decode"]
    assert not any("allocator" in p for p in found)
    assert len(found) == 6, text
