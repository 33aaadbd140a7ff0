#!/usr/bin/env bash
# Build the Go test tools the integration and e2e tests use into the git-ignored .cache/bin/:
#   oci-conformance  OCI distribution-spec conformance suite    tests/tools/conformance/go.mod
#   kube-apiserver   k8s.io/kubernetes/cmd/kube-apiserver        tests/tools/k8s/go.mod
#                    (staging modules k8s.io/* pinned there by replace directives)
#   kubectl          k8s.io/kubernetes/cmd/kubectl               (same go.mod)
#   etcd             the system etcd (Debian etcd-server) when >= 3.5, else
#                    go.etcd.io/etcd/server/v3                   tests/tools/etcd/go.mod
#   helm             helm.sh/helm/v4/cmd/helm (renders the chart) tests/tools/helm/go.mod
# Sources come through the Go module proxy (verified against go.sum); nothing is vendored.
# A binary already built from the same go.mod/go.sum is kept (--force rebuilds).
# Without Go this prints a notice and exits 0: the tests that need the binaries skip.
# Cold: kube-apiserver + kubectl ~6 min on 2 cores (-p=2 bounds memory to ~3 GB; override with
# TEST_BUILD_PARALLELISM), the others well under 2 min together.
# How the tests run kube-apiserver and etcd: tests/support/kube.py.
set -euo pipefail
cd "$(dirname "$0")/.."

force=0
[ "${1:-}" = "--force" ] && force=1

bin_dir="$PWD/.cache/bin"
parallelism="${TEST_BUILD_PARALLELISM:-2}"

# What a binary was built from: a new pin in go.mod/go.sum means a rebuild.
stamp_of() { cat "$1/go.mod" "$1/go.sum" | sha256sum | cut -d' ' -f1; }
current() { [ "$force" -eq 0 ] && [ -x "$1" ] && [ "$(cat "$1.stamp" 2>/dev/null)" = "$2" ]; }

# build <tools dir> <package> <output name> [ldflags]
build() {
  local dir="$1" pkg="$2" out="$bin_dir/$3" ldflags="${4:-}" stamp start
  stamp="$(stamp_of "$dir")"
  if current "$out" "$stamp"; then
    return 0
  fi
  if ! command -v go >/dev/null 2>&1; then
    echo "build-test-binaries: go not found; tests needing $3 will be skipped" >&2
    return 0
  fi
  mkdir -p "$bin_dir"
  echo "build-test-binaries: building $3..." >&2
  start=$(date +%s)
  (
    cd "$dir"
    # -mod=readonly: build exactly what go.mod/go.sum pin, never edit them.
    # -buildvcs=false: tests/tools/etcd's main package lives in this repository.
    GOFLAGS="${GOFLAGS:-} -mod=readonly -buildvcs=false -p=$parallelism" go build -trimpath \
      -ldflags="-s -w $ldflags" -o "$out.tmp" "$pkg"
  )
  rm -f "$out"  # may be a symlink to the system etcd
  mv "$out.tmp" "$out"
  echo "$stamp" >"$out.stamp"
  echo "build-test-binaries: built $3 in $(( $(date +%s) - start ))s ($(du -h "$out" | cut -f1))" >&2
}

# The pinned version of module $2 in go.mod $1.
pinned() { sed -n "s|^\(require\)\{0,1\}[[:space:]]*$2 \(v[0-9][^ ]*\).*$|\2|p" "$1/go.mod"; }

build tests/tools/conformance github.com/opencontainers/distribution-spec/conformance \
  oci-conformance

# Stamp the release into kube-apiserver as Kubernetes's own build does
# (hack/lib/version.sh); otherwise /version reports "v0.0.0-master".
k8s_version="$(pinned tests/tools/k8s k8s.io/kubernetes)"
k8s_ldflags=""
if [ -n "$k8s_version" ]; then
  k8s_minor="${k8s_version#v*.}"
  k8s_minor="${k8s_minor%%.*}"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    k8s_ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1"
    k8s_ldflags+=" -X $pkg.gitMinor=$k8s_minor -X $pkg.gitTreeState=clean"
  done
fi
build tests/tools/k8s k8s.io/kubernetes/cmd/kube-apiserver kube-apiserver "$k8s_ldflags"
build tests/tools/k8s k8s.io/kubernetes/cmd/kubectl kubectl "$k8s_ldflags"

# etcd: kube-apiserver 1.37 needs etcd >= 3.5; Debian 12's etcd-server is 3.4.
system_etcd_ok() {
  local v
  command -v etcd >/dev/null 2>&1 || return 1
  v="$(etcd --version 2>/dev/null | sed -n 's/^etcd Version: *//p')"
  [ -n "$v" ] && [ "$(printf '%s\n3.5.0\n' "$v" | sort -V | head -n1)" = "3.5.0" ]
}
if [ "${TEST_BUILD_ETCD:-0}" != 1 ] && system_etcd_ok; then
  if [ "$(readlink "$bin_dir/etcd" 2>/dev/null)" != "$(command -v etcd)" ]; then
    mkdir -p "$bin_dir"
    rm -f "$bin_dir/etcd" "$bin_dir/etcd.stamp"
    ln -s "$(command -v etcd)" "$bin_dir/etcd"
  fi
else
  [ -L "$bin_dir/etcd" ] && rm -f "$bin_dir/etcd"
  build tests/tools/etcd stowage.test/tools/etcd etcd
fi

helm_version="$(pinned tests/tools/helm helm.sh/helm/v4)"
build tests/tools/helm helm.sh/helm/v4/cmd/helm helm \
  "${helm_version:+-X helm.sh/helm/v4/internal/version.version=$helm_version}"
