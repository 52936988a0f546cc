// Command kaos-coredns is CoreDNS (github.com/coredns/coredns, pinned in go.mod) with only the
// plugins the local cluster's DNS needs: cluster.local answered from the API (kubernetes), plus
// the usual errors/log/health/ready/cache/loadbalance. No forward plugin: the local cluster has
// no route out, so names outside cluster.local get SERVFAIL/NXDOMAIN at once instead of a wait.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// directives in CoreDNS's plugin.cfg order (the order in which a query passes through them).
var directives = []string{"errors", "log", "health", "ready", "cache", "loadbalance", "kubernetes"}

func main() {
	dnsserver.Directives = directives
	coremain.Run()
}
