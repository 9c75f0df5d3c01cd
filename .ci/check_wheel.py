"""Check a built wheel's contents: one package, trtllm_sawint4, with kernels/plugins/build_scripts as its
subpackages, every module of those source folders (a subpackage missing from pyproject's list would be
left out), the CLI entry point, and no tests or repository-only folders.

    python .ci/check_wheel.py WHEEL [REPO_ROOT]
"""

import sys
import zipfile
from pathlib import Path

#: source folder -> where it lands in the wheel (pyproject's package-dir)
SOURCES = {"trtllm_sawint4": "trtllm_sawint4", "kernels": "trtllm_sawint4/kernels",
           "plugins": "trtllm_sawint4/plugins", "build_scripts": "trtllm_sawint4/build_scripts"}

REQUIRED = ["trtllm_sawint4/__init__.py", "trtllm_sawint4/cli.py", "trtllm_sawint4/kernels/__init__.py",
            "trtllm_sawint4/kernels/decode.py", "trtllm_sawint4/kernels/decode_gluon.py",
            "trtllm_sawint4/plugins/__init__.py", "trtllm_sawint4/plugins/contract.py",
            "trtllm_sawint4/build_scripts/__init__.py", "trtllm_sawint4/build_scripts/aot.py",
            "trtllm_sawint4/ops/reference.py", "trtllm_sawint4/eval/main.py"]


def main(path: str, root: str | None = None) -> int:
    names = zipfile.ZipFile(path).namelist()
    problems = [f"missing {n}" for n in REQUIRED if n not in names]
    if root is not None:
        for src, dst in SOURCES.items():
            for f in sorted(Path(root, src).rglob("*.py")):
                if "__pycache__" in f.parts:
                    continue
                rel = f.relative_to(Path(root, src)).as_posix()
                if f"{dst}/{rel}" not in names:
                    problems.append(f"missing {dst}/{rel} (from {src}/{rel}: is its package listed in pyproject.toml?)")
    tops = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")})
    if tops != ["trtllm_sawint4"]:
        problems.append(f"top-level entries other than trtllm_sawint4: {tops}")
    problems += [f"not for the wheel: {n}" for n in names
                 if any(part in ("tests", "scripts", "docs", ".ci") for part in n.split("/")[:-1]) or "conftest" in n]
    entry = next((n for n in names if n.endswith(".dist-info/entry_points.txt")), None)
    if entry is None or "sawint4 = trtllm_sawint4.cli:main" not in zipfile.ZipFile(path).read(entry).decode():
        problems.append("no `sawint4` console script")
    for p in problems:
        print(f"check_wheel: {p}")
    modules = sum(n.endswith(".py") for n in names)
    print(f"check_wheel: {len(names)} files, {modules} modules, {'FAILED' if problems else 'ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
