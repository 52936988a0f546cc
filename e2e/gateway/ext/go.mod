// Traefik's dynamic-config extension point (github.com/traefik/traefik/dynamic/ext): a nested module
// of Traefik's repository that its own go.mod replaces with a relative path, so it is neither in
// Traefik's module zip nor on the module proxy. Open-source Traefik leaves it empty; see ../README.md.
module github.com/traefik/traefik/dynamic/ext

go 1.24.0
