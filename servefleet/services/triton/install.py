"""Where ``tritonserver`` and the environment of its python-backend models live.

Triton 2.51 comes from the ``nvidia-pytriton`` wheel (the only pip package that ships the binary;
the one named ``tritonserver`` is a placeholder), installed by ``scripts/install.sh`` into a
virtualenv of its own made from Debian's ``python3.11``, not into servefleet's: the wheel pins
numpy<2 and its python backend answers with empty outputs under numpy 2, while servefleet itself
needs numpy 2. That env is also where python-backend models run: the backend's stub finds its
interpreter through ``PATH`` and links ``libpython3.11`` from the interpreter's ``LIBDIR``.
Nothing here downloads anything; a missing env is a FailedPrecondition saying how to make it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import servefleet
from servefleet.common.config import settings
from servefleet.common.errors import FailedPrecondition

#: Files of the python backend that must sit together in ``<backends>/python``.
_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
#: Variables of the actor that must not reach the stub's interpreter (they point at servefleet's
#: own environment, whose numpy the models must not import).
_DROPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "LD_PRELOAD")


def _own_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}


def default_env() -> Path:
    return Path(servefleet.__file__).resolve().parent.parent / ".venv-triton"


@dataclass(frozen=True)
class TritonInstall:
    """One tritonserver install: the binary, its bundled libraries, and the models' Python."""

    env: Path  # the virtualenv
    root: Path  # <site-packages>/pytriton/tritonserver
    python_version: str  # "3.11": which backend stub matches the env's interpreter
    libdir: str  # the interpreter's LIBDIR (where its libpython lives)

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.root.parent.parent / "nvidia_pytriton.libs"

    def backends(self) -> Path:
        """A backend directory whose ``python/`` holds the backend and the stub built for this env's
        Python (the wheel keeps stubs per version elsewhere). Made once, atomically, as symlinks;
        made again when its links lead nowhere (an env once reached through a path since removed)."""
        target = self.env / "servefleet-backends"
        stub_link = Path("python") / "triton_python_backend_stub"
        if (target / stub_link).exists():  # follows the links
            return target
        scratch = Path(tempfile.mkdtemp(prefix=".backends-", dir=self.env))
        (scratch / "python").mkdir()
        for name in _BACKEND_FILES:
            (scratch / "python" / name).symlink_to(self.root / "backends" / "python" / name)
        stub = self.root / "python_backend_stubs" / self.python_version / "triton_python_backend_stub"
        (scratch / stub_link).symlink_to(stub)
        if target.is_dir() and not (target / stub_link).exists():  # stale: set it aside first
            stale = Path(tempfile.mkdtemp(prefix=".stale-backends-", dir=self.env))
            with contextlib.suppress(OSError):  # another actor set it aside first
                target.rename(stale / target.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            scratch.rename(target)
        except OSError:  # another actor made it first
            shutil.rmtree(scratch, ignore_errors=True)
        return target

    def child_env(self) -> dict[str, str]:
        """The server's environment: the models' Python first on PATH, its libpython and the
        wheel's bundled libraries on LD_LIBRARY_PATH, nothing of servefleet's own interpreter."""
        env = _own_environ()
        env["PATH"] = os.pathsep.join([str(self.env / "bin"), env.get("PATH", "/usr/bin:/bin")])
        libraries = [self.libdir, str(self.libs), os.environ.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libraries if p)
        return env


@functools.cache
def find(env: str = "") -> TritonInstall:
    """The install in ``env`` (default ``settings.triton_env``, else ``.venv-triton`` beside the
    package); FailedPrecondition naming what is missing and how to make it."""
    # Resolved: the links ``backends`` makes must not depend on the path (a worktree's symlink,
    # say) this env was reached through.
    path = Path(env or settings.triton_env or default_env()).resolve()
    python = path / "bin" / "python"
    binaries = sorted(path.glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver"))
    if not python.exists() or not binaries:
        raise FailedPrecondition(
            f"no tritonserver in {path} (SERVEFLEET_TRITON_ENV): run scripts/install.sh, which makes "
            "it from Debian's python3.11 with nvidia-pytriton==0.7.0 and numpy<2"
        )
    probe = "import sys, sysconfig; print(f'{sys.version_info[0]}.{sys.version_info[1]}'); "
    probe += "print(sysconfig.get_config_var('LIBDIR'))"
    out = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, timeout=60, check=True, env=_own_environ()
    )
    version, libdir = out.stdout.split()
    return TritonInstall(env=path, root=binaries[-1].parent.parent, python_version=version, libdir=libdir)
