"""Run the tritonserver that the nvidia-pytriton wheel bundles, on a generated model repository.

What it takes (found by trying; docs/serving_triton.md has the details):
- The wheel ships a Python-backend stub per Python version but none where the backend looks for it, so a
  backend folder of our own (in the work dir) links libtriton_python.so and the stub of the model
  environment's Python version.
- The stub's interpreter runs isolated (PYTHONPATH is ignored) and takes its environment from the first
  `python3` on PATH: the model environment's bin/ goes first on PATH. It needs that Python's shared
  libpython (LD_LIBRARY_PATH) and the wheel's bundled libraries (nvidia_pytriton.libs).
- That environment must have numpy<2: under numpy 2 this Python backend silently corrupts tensors.
- A stub that cannot start leaves the server "loading" forever: readiness is polled with a timeout, and
  the log is watched for the stub's fatal errors.
- Triton's own SIGTERM handling waits for in-flight requests, and for open HTTP keep-alive connections
  out of the same exit timeout, after which it exits 1 with the model still loaded. So `stop()` first
  drains (a file the model watches: it aborts its requests), then unloads the model through the
  repository API (model control mode "explicit"), then sends SIGTERM.
"""

from __future__ import annotations

import collections
import ctypes
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .triton_repo import MODEL_NAME


class ServeError(RuntimeError):
    """A user-facing failure of `sawint4 serve` (printed without a traceback)."""


#: log lines that mean the model cannot load but the server would stay "loading" (or that say why)
_FATAL_PATTERNS = (
    re.compile(r"error while loading shared libraries"),
    re.compile(r"triton_python_backend_stub is not found"),
    re.compile(r"Stub process .* (is not healthy|failed)"),
    re.compile(r"Failed to (initialize|start) (the )?[Pp]ython stub"),
)


@dataclass(frozen=True)
class TritonInstall:
    """The server of the nvidia-pytriton wheel: <site-packages>/pytriton/tritonserver (or a copy of it that
    keeps the wheel's layout, with nvidia_pytriton.libs two levels up)."""

    root: Path

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    @property
    def libs(self) -> Path:
        return self.root.parent.parent / "nvidia_pytriton.libs"

    def stub(self, python_version: str) -> Path:
        return self.root / "python_backend_stubs" / python_version / "triton_python_backend_stub"


def find_triton(root: str | os.PathLike | None = None) -> TritonInstall:
    if root is None:
        try:
            spec = importlib.util.find_spec("pytriton")
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise ServeError("tritonserver is not installed: it comes with the nvidia-pytriton wheel. Install "
                             "it with: pip install 'trtllm-sawint4[serve]' (or pass --tritonserver-root)")
        root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    install = TritonInstall(Path(root).resolve())
    for path in (install.binary, install.python_backend / "libtriton_python.so"):
        if not path.exists():
            raise ServeError(f"--tritonserver-root {install.root}: {path.relative_to(install.root)} is missing")
    return install


@dataclass(frozen=True)
class ModelEnv:
    """The Python environment the model runs in (Triton's Python-backend stub)."""

    python: Path  # its python3 (its folder goes first on PATH)
    version: str  # "3.11"
    libdir: str  # folder of its shared libpython
    numpy: str


_PROBE = r"""
import json, sys, sysconfig
out = {"version": "%d.%d" % sys.version_info[:2], "libdir": sysconfig.get_config_var("LIBDIR") or "",
       "ldlibrary": sysconfig.get_config_var("LDLIBRARY") or "", "shared": bool(sysconfig.get_config_var("Py_ENABLE_SHARED"))}
try:
    import numpy; out["numpy"] = numpy.__version__
except ImportError as e:
    out["numpy"] = None
try:
    import trtllm_sawint4.serving.triton_model as m  # noqa - imports triton_python_backend_utils: fails here
except ModuleNotFoundError as e:
    out["missing"] = e.name
except Exception:
    pass
print(json.dumps(out))
"""


def probe_model_env(python: str | os.PathLike) -> ModelEnv:
    python = Path(python)
    if not python.exists():
        raise ServeError(f"--stub-python {python}: no such file")
    try:
        r = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ServeError(f"cannot run {python}: {e}") from None
    if r.returncode != 0:
        raise ServeError(f"{python} failed to report its environment:\n{r.stderr.strip()}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    if info.get("missing") not in (None, "triton_python_backend_utils"):
        raise ServeError(f"{python}: cannot import trtllm_sawint4's Triton model (missing module "
                         f"{info['missing']!r}); install trtllm-sawint4 into that environment")
    if info["numpy"] is None:
        raise ServeError(f"{python}: numpy is not installed there; the Triton Python backend needs numpy<2")
    if int(info["numpy"].split(".")[0]) >= 2:
        raise ServeError(
            f"{python} has numpy {info['numpy']}, and the Python backend of this tritonserver needs numpy<2 (with "
            f"numpy 2 it silently corrupts tensors). Install with `pip install 'trtllm-sawint4[serve]'`, which "
            f"brings numpy<2, or give --stub-python a venv that has numpy<2 and sees this environment's packages "
            f"(docs/serving_triton.md, 'numpy')")
    lib = Path(info["libdir"]) / info["ldlibrary"]
    if not info["shared"] or not lib.exists():
        raise ServeError(f"{python}: Python {info['version']} has no shared libpython ({lib}); the Triton "
                         f"Python-backend stub links against libpython{info['version']}.so")
    # Not resolved: a venv's bin/python3 is a symlink to the base interpreter, and the stub must find the venv.
    return ModelEnv(python.absolute(), info["version"], info["libdir"], info["numpy"])


def prepare_backend_dir(work_dir: Path, install: TritonInstall, env: ModelEnv) -> Path:
    """<work>/backends/python: the wheel's Python backend plus the stub of env's Python version (links:
    the stub's RPATH, $ORIGIN-relative, resolves through the link to the wheel's libraries)."""
    stub = install.stub(env.version)
    if not stub.exists():
        raise ServeError(f"this tritonserver has no Python-backend stub for Python {env.version} ({stub})")
    folder = work_dir / "backends" / "python"
    folder.mkdir(parents=True, exist_ok=True)
    for src in (install.python_backend / "libtriton_python.so",
                install.python_backend / "triton_python_backend_utils.py", stub):
        link = folder / src.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src)
    return folder.parent


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the launcher dies (even by SIGKILL), so no server is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class TritonServer:
    """One tritonserver process serving the `sawint4` model of `repo`."""

    def __init__(self, install: TritonInstall, env: ModelEnv, repo: Path, work_dir: Path, *, host: str,
                 http_port: int, grpc_port: int, metrics_port: int, log_file: Path, log_verbose: int = 0,
                 exit_timeout_s: int = 5, echo=None, drain_file: Path | None = None, notify=None):
        self.install, self.env, self.repo, self.work_dir = install, env, Path(repo), Path(work_dir)
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.log_file, self.log_verbose, self.exit_timeout_s = Path(log_file), log_verbose, exit_timeout_s
        self.echo = echo  # a text stream that gets the server's log lines as they come (None: only the file)
        self.drain_file = drain_file
        self.notify = notify or (lambda message: None)  # progress of stop()
        self.shm_prefix = f"sawint4_{os.getpid()}_{int(time.time() * 1000) % 10**8}_"
        self.proc: subprocess.Popen | None = None
        self.fatal: str | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=400)
        self._reader: threading.Thread | None = None

    # ---- process -------------------------------------------------------------------------------
    @property
    def probe_host(self) -> str:
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    @property
    def http_url(self) -> str:
        host = f"[{self.probe_host}]" if ":" in self.probe_host else self.probe_host
        return f"http://{host}:{self.http_port}"

    def command(self) -> list[str]:
        backends = prepare_backend_dir(self.work_dir, self.install, self.env)
        return [
            str(self.install.binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            f"--cache-directory={self.install.root / 'caches'}",
            "--model-control-mode=explicit", f"--load-model={MODEL_NAME}",
            "--disable-auto-complete-config",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={self.log_verbose}",
        ]

    def environment(self) -> dict:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(self.env.python.parent), env.get("PATH", "")])
        libs = [str(self.install.libs), self.env.libdir] + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        return env

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.command(), env=self.environment(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self._reader = threading.Thread(target=self._read_log, name="tritonserver-log", daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        with open(self.log_file, "ab") as out:
            for raw in iter(self.proc.stdout.readline, b""):
                out.write(raw)
                out.flush()
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self._tail.append(line)
                if self.fatal is None and any(p.search(line) for p in _FATAL_PATTERNS):
                    self.fatal = line
                if self.echo is not None:
                    try:
                        print(line, file=self.echo, flush=True)
                    except (OSError, ValueError):
                        pass

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_excerpt(self, max_lines: int = 40) -> str:
        """The lines that say why (errors, the model status table), else the end of the log."""
        if self._reader is not None:
            self._reader.join(timeout=2)
        lines = list(self._tail)
        keep = [ln for ln in lines if re.match(r"^E\d{4} ", ln) or "error" in ln.lower() or "UNAVAILABLE" in ln
                or "Traceback" in ln or ln.startswith(("  File", "    "))]
        keep = [ln for ln in keep if "CudaDriverHelper" not in ln and "NVML" not in ln and "pinned memory" not in ln]
        return "\n".join((keep or lines)[-max_lines:])

    # ---- readiness -----------------------------------------------------------------------------
    def _get(self, path: str, timeout: float = 2.0, method: str = "GET", body: bytes | None = None):
        req = urllib.request.Request(self.http_url + path, data=body, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()

    def is_ready(self) -> bool:
        try:
            return self._get("/v2/health/ready", timeout=1.0)[0] == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout_s: float, should_stop=lambda: False) -> float:
        """Seconds until /v2/health/ready; ServeError (with the log's reason) if the server exits, a stub
        fails, or the timeout passes -- the server is then stopped."""
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise ServeError(f"tritonserver exited with status {self.proc.returncode} while starting:\n"
                                 f"{self.log_excerpt()}")
            if self.fatal is not None:
                self.kill()
                raise ServeError(f"the model's Python stub cannot start ({self.fatal.strip()}):\n{self.log_excerpt()}")
            if self.is_ready():
                return time.monotonic() - t0
            if should_stop():
                raise ServeError("stopped while starting")
            if time.monotonic() - t0 > timeout_s:
                self.kill()
                raise ServeError(f"tritonserver was not ready after {timeout_s:.0f}s (see {self.log_file}):\n"
                                 f"{self.log_excerpt()}")
            time.sleep(0.2)

    # ---- stopping ------------------------------------------------------------------------------
    def _model_state(self) -> str | None:
        try:
            _, body = self._get("/v2/repository/index", method="POST", body=b"{}")
        except (OSError, urllib.error.URLError):
            return None
        for entry in json.loads(body or b"[]"):
            if entry.get("name") == MODEL_NAME:
                return entry.get("state")
        return "UNAVAILABLE"

    def stop(self, drain_timeout_s: float = 60.0) -> int:
        """Drain, unload the model, SIGTERM; the server's exit status (1 if it had to be killed)."""
        if not self.alive:
            return self.wait()
        t0 = time.monotonic()
        if self.drain_file is not None:
            self.drain_file.touch()
            self.notify("stopping: the model aborts its requests in flight")
        try:
            self._get(f"/v2/repository/models/{MODEL_NAME}/unload", method="POST", body=b"{}", timeout=10)
            deadline = time.monotonic() + drain_timeout_s
            while self.alive and time.monotonic() < deadline:
                if self._model_state() in (None, "UNAVAILABLE"):
                    break
                time.sleep(0.1)
            self.notify(f"model unloaded after {time.monotonic() - t0:.1f}s; stopping tritonserver")
        except (OSError, urllib.error.URLError):
            pass  # not serving HTTP (still starting, or failing): SIGTERM alone
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(self.exit_timeout_s + 20)
        except subprocess.TimeoutExpired:
            self.notify("tritonserver did not exit: killed")
            self.kill()
            return 1
        rc = self.wait()
        self.notify(f"tritonserver exited with status {rc}, {time.monotonic() - t0:.1f}s after the stop began")
        return rc

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()
        self.wait()

    def wait(self) -> int:
        rc = self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._remove_leftover_shm()
        return rc

    def _remove_leftover_shm(self) -> None:
        """A server that died (or was killed) leaves its Python-backend shared memory behind; ours has our prefix."""
        shm = Path("/dev/shm")
        if shm.is_dir():
            for region in shm.glob(f"{self.shm_prefix}*"):
                try:
                    region.unlink()
                except OSError:
                    pass


def main_env_python() -> Path:
    """The python3 of the running environment (a venv's bin/python3), whose folder goes first on PATH."""
    exe = Path(sys.executable)
    for name in ("python3", exe.name):
        if (exe.parent / name).exists():
            return exe.parent / name
    return exe
