// Command etcd is upstream etcd (go.etcd.io/etcd/server/v3/etcdmain) at the
// version pinned in go.mod, built by scripts/build-k8s-binaries.sh into
// .cache/bin/etcd when the system etcd is missing or older than 3.5.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
