"""Generated CRI (Container Runtime Interface) gRPC stubs: package ``runtime.v1``.

Source: ``pkg/apis/runtime/v1/api.proto`` of the Go module k8s.io/cri-api@v0.37.2
(Kubernetes v1.37.2), compiled by grpcio-tools (messages, services) and mypy-protobuf
(``.pyi`` stubs). Do not edit: regenerate with ``scripts/gen-cri-stubs.sh``
(``CRI_API_VERSION=vX.Y.Z scripts/gen-cri-stubs.sh`` for another tag).
"""

CRI_API_VERSION = "v0.37.2"
