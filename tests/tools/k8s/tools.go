//go:build tools

// Package tools pins the Kubernetes API server and kubectl the e2e tests run
// (scripts/build-test-binaries.sh builds them into .cache/bin/). Nothing here is
// compiled into stowage; the build tag keeps `go build ./...` from touching it.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
