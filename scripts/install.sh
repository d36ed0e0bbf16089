#!/usr/bin/env bash
# Installs everything servefleet needs on a fresh Debian machine: system packages (when missing),
# a virtualenv in .venv with servefleet and its dev tools, the generated gRPC stubs, and the
# Triton environment for kind: triton (.venv-triton, scripts/install-triton.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v redis-server >/dev/null || need+=(redis-server)
command -v make >/dev/null || need+=(make)
# The C++ direct ingress (setup.py) compiles against Debian's gRPC C++ and protobuf.
command -v g++ >/dev/null || need+=(g++)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v grpc_cpp_plugin >/dev/null || need+=(protobuf-compiler-grpc)
pkg-config --exists grpc++ 2>/dev/null || need+=(libgrpc++-dev)
pkg-config --exists protobuf 2>/dev/null || need+=(libprotobuf-dev)
[ -f /usr/include/python3.11/Python.h ] || need+=(python3-dev)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  echo "installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
make -s protos PYTHON=.venv/bin/python
bash scripts/install-triton.sh
echo "installed: .venv/bin/servefleet"
