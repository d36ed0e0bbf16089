"""Builds the C++ direct ingress, ``servefleet.direct._direct``.

Everything else about the package lives in pyproject.toml. The KServe v2 C++ stubs are generated
at build time from the descriptor set that tritonclient's Python modules carry (read by Debian's
``protoc --descriptor_set_in``), so the C++ and Python sides share one contract and no second
copy of the proto exists. Objects are cached under build/direct by content hash: a reinstall with
unchanged sources only relinks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
SOURCES = ROOT / "cpp"
WORK = ROOT / "build" / "direct"
PROTO_FILES = ("grpc_service.proto", "model_config.proto")
SYSTEM_TOOLS = {
    "protoc": "protobuf-compiler",
    "grpc_cpp_plugin": "protobuf-compiler-grpc",
    "pkg-config": "pkg-config",
    "g++": "g++",
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SystemExit(
            f"building servefleet.direct needs `{name}` (Debian package {SYSTEM_TOOLS[name]}, plus "
            "libgrpc++-dev and libprotobuf-dev): run scripts/install.sh"
        )
    return path


def _pkg_config(flag: str) -> list[str]:
    return subprocess.check_output([_tool("pkg-config"), flag, "grpc++", "protobuf"], text=True).split()


def _export_descriptor_set(path: Path) -> None:
    """The contract exactly as tritonclient's Python stubs define it."""
    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import model_config_pb2, service_pb2

    files = descriptor_pb2.FileDescriptorSet()
    for module in (model_config_pb2, service_pb2):
        module.DESCRIPTOR.CopyToProto(files.file.add())
    path.write_bytes(files.SerializeToString(deterministic=True))


def _generate_stubs(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    descriptors = out / "triton.desc"
    _export_descriptor_set(descriptors)
    subprocess.check_call(
        [
            _tool("protoc"),
            f"--descriptor_set_in={descriptors}",
            f"--cpp_out={out}",
            f"--grpc_out={out}",
            f"--plugin=protoc-gen-grpc={_tool('grpc_cpp_plugin')}",
            *PROTO_FILES,
        ]
    )
    return sorted(out.glob("*.pb.cc"))


class BuildDirect(build_ext):
    """Generates the stubs, compiles in parallel (SERVEFLEET_BUILD_JOBS, default 2), links."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        generated = WORK / "gen"
        sources = _generate_stubs(generated) + sorted(SOURCES.glob("*.cc"))
        headers = sorted(generated.glob("*.h")) + sorted(SOURCES.glob("*.h"))
        flags = [
            "-O2",
            "-std=c++17",
            "-fPIC",
            "-fvisibility=hidden",
            f"-I{generated}",
            f"-I{SOURCES}",
            f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
            *_pkg_config("--cflags"),
        ]
        # pybind11 lives in a throwaway build environment: key objects on its version, not its path.
        stable = [f for f in flags if pybind11.get_include() not in f] + [pybind11.__version__]
        # Generated code depends on generated headers only: editing cpp/ does not recompile it.
        digests = {
            folder: hashlib.sha256(
                b"".join(h.read_bytes() for h in headers if h.parent == folder)
            ).hexdigest()
            for folder in (generated, SOURCES)
        }
        objects_dir = WORK / "obj"
        objects_dir.mkdir(parents=True, exist_ok=True)

        def compile_one(source: Path) -> Path:
            key = hashlib.sha256(
                source.read_bytes()
                + digests[generated].encode()
                + (digests[SOURCES].encode() if source.parent == SOURCES else b"")
                + " ".join(stable).encode()
            ).hexdigest()[:16]
            obj = objects_dir / f"{source.stem}-{key}.o"
            if not obj.exists():
                print(f"compiling {source.name}", flush=True)
                tmp = obj.with_suffix(".tmp")
                subprocess.check_call([_tool("g++"), *flags, "-c", str(source), "-o", str(tmp)])
                tmp.replace(obj)
            return obj

        jobs = int(os.environ.get("SERVEFLEET_BUILD_JOBS", "2"))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            objects = list(pool.map(compile_one, sources))
        for stale in set(objects_dir.glob("*.o")) - set(objects):
            stale.unlink()
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.check_call(
            [_tool("g++"), "-shared", *map(str, objects), "-o", str(target), *_pkg_config("--libs")]
        )


setup(
    ext_modules=[Extension("servefleet.direct._direct", sources=[])],
    cmdclass={"build_ext": BuildDirect},
)
