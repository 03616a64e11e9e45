// A slim CoreDNS: the upstream server with only the plugins detectord's tests and lab use.
// Built by scripts/build-coredns.sh, the documented way to choose CoreDNS's plugin set.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/erratic"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/file"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
	_ "github.com/coredns/coredns/plugin/template"
	_ "github.com/coredns/coredns/plugin/whoami"
)

// The order of plugin.cfg in CoreDNS v1.12.4, keeping the plugins imported above.
var directives = []string{
	"reload", "bind", "ready", "health", "prometheus", "errors", "log", "cache", "template",
	"hosts", "file", "loop", "forward", "erratic", "whoami",
}

func init() { dnsserver.Directives = directives }

func main() { coremain.Run() }
