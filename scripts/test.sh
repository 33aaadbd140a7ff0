#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run it.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(docker-registry skopeo containerd apache2-utils)
python3 -m uv --version >/dev/null 2>&1 || python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo_=""; [ "$(id -u)" -ne 0 ] && sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! python3 -m uv --version >/dev/null 2>&1; then
  # A Debian system Python refuses pip installs (PEP 668) unless told otherwise.
  python3 -m pip install -q uv 2>/dev/null || python3 -m pip install -q --break-system-packages uv
fi
uv() { python3 -m uv "$@"; }
uv sync -q --frozen

uv run ruff check src tests
uv run mypy
uv run lint-imports
scripts/build-test-binaries.sh  # Go test tools (conformance suite, kube-apiserver, etcd, kubectl, helm) into .cache/bin/
uv run pytest -q -p no:cacheprovider "$@"
