#!/usr/bin/env bash
# Regenerate the CRI gRPC stubs in src/stowage/agent/criapi/ from k8s.io/cri-api's api.proto.
#
#   scripts/gen-cri-stubs.sh            # the pinned version below
#   CRI_API_VERSION=v0.38.0 scripts/gen-cri-stubs.sh
#
# Needs Go (only to fetch the module through the Go module proxy) and the dev dependencies
# (grpcio-tools, mypy-protobuf): `python3 -m uv sync`. The proto is compiled under the path
# stowage/agent/criapi/api.proto so that the generated api_pb2_grpc.py imports its messages
# from the package; the protobuf package (runtime.v1) and so the gRPC method names
# (/runtime.v1.ImageService/PullImage, ...) are unchanged. The generated code checks the
# protobuf and grpcio runtime versions at import: keep the pyproject lower bounds at least
# the "Protobuf Python Version" and GRPC_GENERATED_VERSION the files name.
set -euo pipefail
cd "$(dirname "$0")/.."

version="${CRI_API_VERSION:-v0.37.2}"
out=src/stowage/agent/criapi

moddir="$(cd "${TMPDIR:-/tmp}" && GOFLAGS=-mod=mod go mod download -json "k8s.io/cri-api@${version}" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
proto="${moddir}/pkg/apis/runtime/v1/api.proto"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/stowage/agent/criapi"
cp "$proto" "$work/stowage/agent/criapi/api.proto"
chmod u+w "$work/stowage/agent/criapi/api.proto"

# Old tags (before Kubernetes 1.26) import gogo/protobuf options for Go; the tags this script
# is meant for do not. Refuse rather than compile a proto we have not checked.
if grep -q gogoproto "$work/stowage/agent/criapi/api.proto"; then
  echo "k8s.io/cri-api@${version} uses gogoproto options; pick a newer tag" >&2
  exit 1
fi

rm -f "$out"/api_pb2.py "$out"/api_pb2.pyi "$out"/api_pb2_grpc.py "$out"/api_pb2_grpc.pyi
python3 -m uv run --group dev python -m grpc_tools.protoc \
  -I "$work" \
  --python_out=src --mypy_out=src \
  --grpc_python_out=src --mypy_grpc_out=src \
  "$work/stowage/agent/criapi/api.proto"

kube="1.${version#v0.}"  # k8s.io/cri-api v0.X.Y is published with Kubernetes v1.X.Y
cat >"$out/__init__.py" <<PY
"""Generated CRI (Container Runtime Interface) gRPC stubs: package \`\`runtime.v1\`\`.

Source: \`\`pkg/apis/runtime/v1/api.proto\`\` of the Go module k8s.io/cri-api@${version}
(Kubernetes v${kube}), compiled by grpcio-tools (messages, services) and mypy-protobuf
(\`\`.pyi\`\` stubs). Do not edit: regenerate with \`\`scripts/gen-cri-stubs.sh\`\`
(\`\`CRI_API_VERSION=vX.Y.Z scripts/gen-cri-stubs.sh\`\` for another tag).
"""

CRI_API_VERSION = "${version}"
PY
echo "generated $out from k8s.io/cri-api@${version}"
