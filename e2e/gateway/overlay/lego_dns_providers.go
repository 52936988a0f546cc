// Built in place of lego's providers/dns/zz_gen_dns_providers.go (go build -overlay, see
// ../build.py): the registry of ACME DNS-01 providers, each of which imports a DNS vendor's SDK.
// Fourteen of those SDK modules are not served by the module proxy this project may use, and
// the local gateway never requests certificates, so this build registers no DNS provider.
package dns

import (
	"fmt"

	"github.com/go-acme/lego/v5/challenge"
)

// NewDNSChallengeProviderByName is what Traefik's ACME provider calls for a DNS-01 challenge.
func NewDNSChallengeProviderByName(name string) (challenge.Provider, error) {
	return nil, fmt.Errorf("DNS challenge provider %q: this Traefik build (kaos-modelapi's local gateway) has no ACME DNS providers", name)
}
