#!/usr/bin/env bash
# Build the Kubernetes API server (and etcd, when the system has no usable one)
# the Kubernetes integration tests run, into the git-ignored .cache/bin/:
#   .cache/bin/kube-apiserver  k8s.io/kubernetes/cmd/kube-apiserver at the version
#                              pinned in tests/tools/k8s/go.mod (staging modules
#                              k8s.io/* pinned there by replace directives)
#   .cache/bin/etcd            /usr/bin/etcd (Debian etcd-server) when it is >= 3.5,
#                              otherwise go.etcd.io/etcd/server/v3 at the version
#                              pinned in tests/tools/etcd/go.mod
# Sources come through the Go module proxy (verified against go.sum); nothing is vendored.
# A binary already built from the same go.mod/go.sum is kept (--force rebuilds it).
# Without Go this prints a notice and exits 0: the tests that need the binaries skip.
# A cold build of kube-apiserver takes several minutes on 2 cores; parallelism is
# capped with -p=2 (override with K8S_BUILD_PARALLELISM) to bound memory.
#
# How the tests start a control plane (verified with kube-apiserver v1.37.2 and
# etcd v3.7.3: /readyz ok ~2s after start; namespaces listed, a namespace, a pod
# and a CRD + custom object created over curl). Every address is loopback; pick
# free ports; every file lives in a temp dir $d:
#
#   openssl genrsa -out $d/sa.key 2048
#   echo "$TOKEN,admin,admin-uid,system:masters" >$d/tokens.csv   # token,user,uid,"groups"
#
#   etcd --name=test --data-dir=$d/etcd \
#     --listen-client-urls=http://127.0.0.1:$ETCD_PORT \
#     --advertise-client-urls=http://127.0.0.1:$ETCD_PORT \
#     --listen-peer-urls=http://127.0.0.1:$PEER_PORT \
#     --initial-advertise-peer-urls=http://127.0.0.1:$PEER_PORT \
#     --initial-cluster=test=http://127.0.0.1:$PEER_PORT \
#     --unsafe-no-fsync --quota-backend-bytes=2147483648 --log-level=warn
#   ready: curl -s http://127.0.0.1:$ETCD_PORT/health  ->  {"health":"true",...}
#
#   kube-apiserver \
#     --etcd-servers=http://127.0.0.1:$ETCD_PORT \
#     --bind-address=127.0.0.1 --advertise-address=127.0.0.1 \
#     --endpoint-reconciler-type=none \
#     --secure-port=$API_PORT --cert-dir=$d/certs \
#     --service-account-issuer=https://127.0.0.1:$API_PORT \
#     --service-account-key-file=$d/sa.key \
#     --service-account-signing-key-file=$d/sa.key \
#     --service-cluster-ip-range=10.0.0.0/24 \
#     --token-auth-file=$d/tokens.csv \
#     --authorization-mode=RBAC \
#     --allow-privileged=true \
#     --disable-admission-plugins=ServiceAccount \
#     --enable-priority-and-fairness=false
#   ready: curl -s --cacert $d/certs/apiserver.crt https://127.0.0.1:$API_PORT/readyz -> ok
#          (poll; /readyz, /livez, /version are readable anonymously)
#   use:   curl -s --cacert $d/certs/apiserver.crt -H "Authorization: Bearer $TOKEN" \
#            https://127.0.0.1:$API_PORT/api/v1/namespaces
#
# Notes:
# - --endpoint-reconciler-type=none is required with --advertise-address=127.0.0.1
#   ("cannot use public IP 127.0.0.1 with endpoint reconciler ... may not be in the
#   loopback range"); without --advertise-address the apiserver would advertise the
#   host's non-loopback IP in the default/kubernetes Endpoints.
# - --disable-admission-plugins=ServiceAccount: there is no controller-manager to
#   create the "default" ServiceAccount, so pod creation fails with
#   'error looking up service account t1/default' otherwise.
# - The self-signed serving cert is written to $d/certs/apiserver.crt (cert + CA,
#   SANs include IP 127.0.0.1), usable as the kubeconfig's certificate-authority.
#   The kubeconfig user authenticates with the token (group system:masters = admin).
#   Requests without a token are user system:anonymous (403), a wrong token is 401.
# - Debian 12's etcd-server (3.4.23) also starts and serves this apiserver, but it
#   logs "RequestWatchProgress feature is not supported" and falls back from
#   consistent watch-cache reads; kube-apiserver 1.37 targets etcd 3.5+ (its client
#   is 3.7), so etcd is built unless the system one is >= 3.5.
# - Stop with SIGTERM, apiserver first (~1s), then etcd. Startup logs a few harmless
#   E-lines (kube-system not found yet, "manifest file is empty").
# - RSS after start: kube-apiserver ~280 MiB, etcd ~40 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."

force=0
[ "${1:-}" = "--force" ] && force=1

bin_dir="$PWD/.cache/bin"
apiserver="$bin_dir/kube-apiserver"
etcd="$bin_dir/etcd"
parallelism="${K8S_BUILD_PARALLELISM:-2}"

# What a binary was built from: a new pin in go.mod/go.sum means a rebuild.
stamp_of() { cat "$1/go.mod" "$1/go.sum" | sha256sum | cut -d' ' -f1; }
current() { [ "$force" -eq 0 ] && [ -x "$1" ] && [ "$(cat "$1.stamp" 2>/dev/null)" = "$2" ]; }

# build <tools dir> <package> <output> [ldflags]
build() {
  local dir="$1" pkg="$2" out="$3" ldflags="${4:-}" stamp start
  stamp="$(stamp_of "$dir")"
  if current "$out" "$stamp"; then
    return 0
  fi
  if ! command -v go >/dev/null 2>&1; then
    echo "build-k8s-binaries: go not found; the Kubernetes tests will be skipped" >&2
    exit 0
  fi
  mkdir -p "$bin_dir"
  echo "build-k8s-binaries: building $out (this can take several minutes)..." >&2
  start=$(date +%s)
  (
    cd "$dir"
    # -mod=readonly: build exactly what go.mod/go.sum pin, never edit them.
    # -buildvcs=false: tests/tools/etcd's main package lives in this repository;
    # its git state has nothing to do with the binary.
    GOFLAGS="${GOFLAGS:-} -mod=readonly -buildvcs=false -p=$parallelism" go build -trimpath \
      -ldflags="-s -w $ldflags" -o "$out.tmp" "$pkg"
  )
  rm -f "$out"  # may be a symlink to the system etcd
  mv "$out.tmp" "$out"
  echo "$stamp" >"$out.stamp"
  echo "build-k8s-binaries: built $out in $(( $(date +%s) - start ))s ($(du -h "$out" | cut -f1))" >&2
}

# Stamp the release into the binary as Kubernetes's own build does
# (hack/lib/version.sh); otherwise /version reports "v0.0.0-master".
k8s_version="$(sed -n 's/^\(require\)\{0,1\}[[:space:]]*k8s\.io\/kubernetes \(v[0-9][^ ]*\).*$/\2/p' tests/tools/k8s/go.mod)"
k8s_ldflags=""
if [ -n "$k8s_version" ]; then
  k8s_minor="${k8s_version#v*.}"
  k8s_minor="${k8s_minor%%.*}"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    k8s_ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1"
    k8s_ldflags+=" -X $pkg.gitMinor=$k8s_minor -X $pkg.gitTreeState=clean"
  done
fi
build tests/tools/k8s k8s.io/kubernetes/cmd/kube-apiserver "$apiserver" "$k8s_ldflags"

# etcd: kube-apiserver needs etcd >= 3.5. Use the system one (Debian's etcd-server
# package) when it is new enough; Debian 12 ships 3.4, so there it is built.
system_etcd_ok() {
  local v
  command -v etcd >/dev/null 2>&1 || return 1
  v="$(etcd --version 2>/dev/null | sed -n 's/^etcd Version: *//p')"
  [ -n "$v" ] && [ "$(printf '%s\n3.5.0\n' "$v" | sort -V | head -n1)" = "3.5.0" ]
}
if [ "${K8S_BUILD_ETCD:-0}" != 1 ] && system_etcd_ok; then
  if [ "$(readlink "$etcd" 2>/dev/null)" != "$(command -v etcd)" ]; then
    mkdir -p "$bin_dir"
    rm -f "$etcd" "$etcd.stamp"
    ln -s "$(command -v etcd)" "$etcd"
  fi
else
  [ -L "$etcd" ] && rm -f "$etcd"
  build tests/tools/etcd stowage.test/tools/etcd "$etcd"
fi
