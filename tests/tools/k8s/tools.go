//go:build tools

// Package tools pins the Kubernetes API server the integration tests run
// (scripts/build-k8s-binaries.sh builds it into .cache/bin/). Nothing here is
// compiled into stowage; the build tag keeps `go build ./...` from touching it.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
)
