#!/usr/bin/env bash
# The Triton environment for `kind: triton` (default .venv-triton, or $SERVEFLEET_TRITON_ENV):
# tritonserver 2.51 from the nvidia-pytriton wheel (the only pip package shipping the binary) and
# numpy<2, in a virtualenv of Debian's python3.11. Its own env, not .venv: the python backend's stub
# links the system libpython3.11 and returns empty outputs under numpy 2, which servefleet needs.
# Python-backend models run here; nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
env=${SERVEFLEET_TRITON_ENV:-.venv-triton}

need=()
[ -x /usr/bin/python3.11 ] || need+=(python3.11)
/usr/bin/python3.11 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3.11-venv)
ldconfig -p | grep -q 'libpython3.11.so.1.0' || need+=(libpython3.11)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  echo "installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

[ -x "$env/bin/python" ] || /usr/bin/python3.11 -m venv "$env"
# --no-deps: only the bundled server is used (not PyTriton's Python API and its dependencies).
"$env/bin/python" -m pip install -q --no-deps 'nvidia-pytriton==0.7.0' 'numpy>=1.26,<2'
echo "installed: $env (tritonserver 2.51 from nvidia-pytriton 0.7.0, numpy<2)"
