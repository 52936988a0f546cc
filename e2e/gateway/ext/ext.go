// Package ext holds the types Traefik's dynamic configuration embeds for builds that extend it
// (pkg/config/dynamic/http_config.go inlines ext.HTTP and ext.Router). This build adds nothing,
// so both are empty: they add no fields to the configuration.
package ext

// HTTP is inlined in Traefik's dynamic.HTTP.
type HTTP struct{}

// Router is inlined in Traefik's dynamic.Router.
type Router struct{}
