"""The python-backend directory that ``TritonInstall.backends`` links together: rebuilt when its
links lead nowhere (an env first reached through a worktree's symlink that is gone since)."""

from __future__ import annotations

from pathlib import Path

from servefleet.services.triton.install import TritonInstall

STUB = Path("python") / "triton_python_backend_stub"


def fake_install(root: Path) -> TritonInstall:
    """An env with the wheel's layout: the backend files and a 3.11 stub."""
    env = root / "env"
    wheel = env / "lib" / "python3.11" / "site-packages" / "pytriton" / "tritonserver"
    (wheel / "backends" / "python").mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (wheel / "backends" / "python" / name).write_text(name)
    (wheel / "python_backend_stubs" / "3.11").mkdir(parents=True)
    (wheel / "python_backend_stubs" / "3.11" / "triton_python_backend_stub").write_text("stub")
    return TritonInstall(env=env, root=wheel, python_version="3.11", libdir="")


def test_backends_are_linked_once_and_reused(tmp_path: Path) -> None:
    install = fake_install(tmp_path)
    made = install.backends()
    assert (made / STUB).read_text() == "stub"
    assert (made / "python" / "libtriton_python.so").read_text() == "libtriton_python.so"
    assert install.backends() == made and (made / STUB).is_symlink()


def test_links_through_a_path_since_removed_are_made_again(tmp_path: Path) -> None:
    install = fake_install(tmp_path)
    # As a worktree's `.venv-triton -> main's` symlink did: the links go through the symlink.
    (tmp_path / "worktree").mkdir()
    (tmp_path / "worktree" / ".venv-triton").symlink_to(install.env)
    through = TritonInstall(
        env=tmp_path / "worktree" / ".venv-triton",
        root=tmp_path / "worktree" / ".venv-triton" / install.root.relative_to(install.env),
        python_version="3.11",
        libdir="",
    )
    stale = through.backends()
    assert (stale / STUB).exists()
    (tmp_path / "worktree" / ".venv-triton").unlink()  # the worktree is removed
    assert not (install.env / "servefleet-backends" / STUB).exists()  # dangling now

    made = install.backends()
    assert (made / STUB).read_text() == "stub"
    assert not list(install.env.glob(".stale-backends-*")) and not list(install.env.glob(".backends-*"))
