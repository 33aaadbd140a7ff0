#!/usr/bin/env bash
# Build the Go test tools the integration tests use into the git-ignored .cache/bin/:
#   .cache/bin/oci-conformance  the OCI distribution-spec conformance suite
#                               (github.com/opencontainers/distribution-spec/conformance),
#                               at the version pinned in tests/tools/conformance/go.mod.
# Sources come through the Go module proxy (verified against go.sum); nothing is vendored.
# A binary already built from the same go.mod/go.sum is kept (--force rebuilds it).
# Without Go this prints a notice and exits 0: the tests that need the binary skip.
set -euo pipefail
cd "$(dirname "$0")/.."

force=0
[ "${1:-}" = "--force" ] && force=1

bin_dir="$PWD/.cache/bin"
conformance="$bin_dir/oci-conformance"
# What the binary was built from: a new pin in go.mod/go.sum means a rebuild.
stamp="$(cat tests/tools/conformance/go.mod tests/tools/conformance/go.sum | sha256sum | cut -d' ' -f1)"

if [ "$force" -eq 0 ] && [ -x "$conformance" ] \
  && [ "$(cat "$conformance.stamp" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
if ! command -v go >/dev/null 2>&1; then
  echo "build-test-binaries: go not found; the conformance test will be skipped" >&2
  exit 0
fi

mkdir -p "$bin_dir"
start=$(date +%s)
(
  cd tests/tools/conformance
  # -mod=readonly: build exactly what go.mod/go.sum pin, never edit them.
  GOFLAGS="${GOFLAGS:-} -mod=readonly" go build -trimpath -o "$conformance.tmp" \
    github.com/opencontainers/distribution-spec/conformance
)
mv "$conformance.tmp" "$conformance"
echo "$stamp" >"$conformance.stamp"
echo "build-test-binaries: built $conformance in $(( $(date +%s) - start ))s" >&2
