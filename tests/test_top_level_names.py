"""The repository's top-level folders are importable under their own names whenever the repository root
is on sys.path (``python -m pytest``, ``python -c`` run from it). ``kernels`` is also the name of Hugging
Face's package, which transformers >= 5.25 depends on and imports at start-up, so ours must give the name
up to an installed one and otherwise stay inert."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _import_kernels_from_repo_root(extra_path: Path | None, *python_flags: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)  # after the repo root, which `-c` puts first
    code = (
        "import kernels, sys; "
        "print(getattr(kernels, 'ORIGIN', 'ours' if hasattr(kernels, 'HAVE_TRITON') else 'other'), "
        "getattr(kernels, '__version__', 'no-version'), sys.modules['kernels'] is kernels)"
    )
    result = subprocess.run([sys.executable, *python_flags, "-c", code], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_an_installed_kernels_package_wins_over_the_repository_folder(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("ORIGIN = 'installed'\n__version__ = '0.19.1'\n")
    assert _import_kernels_from_repo_root(site) == "installed 0.19.1 True"


def test_without_an_installed_kernels_package_the_folder_is_inert_and_has_no_version():
    # -S leaves site-packages (and any Hugging Face kernels in it) off sys.path; the repo root stays first
    assert _import_kernels_from_repo_root(None, "-S") == "ours no-version True"
