"""The `kaos-modelapi` command: `render` and `crd` work offline; `run` is the operator."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

import pydantic
import yaml

from . import __version__, crd, desired, yamlio
from .api import ModelAPI, describe_validation_error
from .settings import GatewayRef, Settings

if TYPE_CHECKING:
    from .operator import Options

EXIT_USAGE = 2
EXIT_STARTUP = 1


class InputError(Exception):
    """A file that is not a valid ModelAPI: printed as one line, exit status 2."""


def parse_modelapi(doc: Any, origin: str) -> ModelAPI:
    if not isinstance(doc, dict):
        raise InputError(f"{origin}: not a Kubernetes object")
    try:
        return ModelAPI.model_validate(doc)
    except pydantic.ValidationError as e:
        raise InputError(f"{origin}: {describe_validation_error(e)}") from None


def read_modelapis(stream: TextIO, source: str) -> Iterator[ModelAPI]:
    try:
        docs = [d for d in yaml.safe_load_all(stream) if d is not None]
    except yaml.YAMLError as e:
        raise InputError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
    for index, doc in enumerate(docs, start=1):
        if isinstance(doc, dict) and doc.get("kind") != "ModelAPI":
            continue  # Secrets and the like often travel in the same file
        name = doc.get("metadata", {}).get("name", "?") if isinstance(doc, dict) else "?"
        yield parse_modelapi(doc, f"{source}: document {index} (ModelAPI {name})")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    parser.add_argument("--litellm-image", default=defaults.litellm_image, help="image of Proxy pods")
    parser.add_argument("--ollama-image", default=defaults.ollama_image, help="image of Hosted pods")
    parser.add_argument("--gateway-name", default="", help="Gateway for HTTPRoutes (none: no routes)")
    parser.add_argument("--gateway-namespace", default="", help="namespace of that Gateway")
    parser.add_argument("--gateway-section-name", default="", help="listener of that Gateway (optional)")
    parser.add_argument("--cluster-domain", default=defaults.cluster_domain, help="DNS domain of Services")


def settings_from_args(args: argparse.Namespace) -> Settings:
    gateway = None
    if args.gateway_name:
        if not args.gateway_namespace:
            raise InputError("--gateway-name needs --gateway-namespace")
        gateway = GatewayRef(args.gateway_name, args.gateway_namespace, args.gateway_section_name or None)
    return Settings(args.litellm_image, args.ollama_image, gateway, args.cluster_domain)


def render(args: argparse.Namespace, out: TextIO) -> None:
    settings = settings_from_args(args)
    with open(args.filename, encoding="utf-8") if args.filename != "-" else sys.stdin as stream:
        modelapis = list(read_modelapis(stream, args.filename))
    if not modelapis:
        raise InputError(f"{args.filename}: no ModelAPI found")
    objects: list[dict[str, Any]] = []
    for m in modelapis:
        try:
            objects += desired.build(m, settings).children
        except desired.SpecError as e:
            raise InputError(f"{args.filename}: ModelAPI {m.metadata.name}: {e.message}") from None
    yamlio.dump_all(objects, out)


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


# Requests in flight at once (--kube-api-in-flight). Three keep up with 16 workers on a busy API server as four
# did (a cold converge of 500, alternating: 40-46 s and 5.3-6.2 s of CPU either way) and open one connection
# fewer in a burst: 23.6-26.6 KiB per ModelAPI above idle at N=100 against 27.6-29.7.
KUBE_API_IN_FLIGHT = 3


def add_run_parser(sub: Any) -> None:
    """The operator's flags, named as controller-runtime names them where it has one."""
    run = sub.add_parser("run", help="run the operator")
    run.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="kubeconfig (default: in-cluster)")
    run.add_argument("--namespaces", default=_env("WATCH_NAMESPACES", ""),
                     help="comma-separated namespaces to watch (default: all)")
    add_settings_flags(run)
    run.add_argument("--workers", type=int, default=16, help="concurrent reconciles")
    # No client-side limit by default, as controller-runtime since 0.21 on SIG API Machinery's advice: the API
    # server's Priority and Fairness shares it out; a fixed rate only made a large converge wait on itself.
    run.add_argument("--kube-api-qps", type=float, default=0.0,
                     help="requests per second to the API server after a burst (0, the default: no client-side "
                          "limit, API Priority and Fairness applies)")
    run.add_argument("--kube-api-burst", type=int, default=200,
                     help="requests allowed at once before --kube-api-qps (when it is set)")
    run.add_argument("--kube-api-in-flight", type=int, default=KUBE_API_IN_FLIGHT,
                     help="requests to the API server in flight at once, watches, the leader's Lease and pod log "
                          "reads aside (0: no limit); each is a connection, held open until it idles out")
    run.add_argument("--resync-period", type=float, default=600.0, help="seconds between full resyncs")
    run.add_argument("--watch-timeout", type=int, default=300,
                     help="the API server ends each watch after between this many seconds and twice that (a new "
                          "watch resumes where it ended); a watch silent for this long plus 30 s is dropped")
    run.add_argument("--metrics-bind-address", default=":8080", help='metrics address ("0" disables)')
    run.add_argument("--health-probe-bind-address", default=":8081", help="/healthz and /readyz address")
    run.add_argument("--leader-elect", action="store_true", help="elect a leader on a Lease before writing")
    run.add_argument("--leader-election-id", default="kaos-modelapi", help="name of the Lease")
    run.add_argument("--leader-election-namespace", default=_env("POD_NAMESPACE", "default"),
                     help="namespace of the Lease")
    run.add_argument("--leader-elect-lease-duration", type=float, default=15.0)
    run.add_argument("--leader-elect-renew-deadline", type=float, default=10.0)
    run.add_argument("--leader-elect-retry-period", type=float, default=2.0)
    run.add_argument("--log-level", default=_env("LOG_LEVEL", "info"),
                     choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", default=_env("LOG_FORMAT", "json"), choices=["json", "console"])


def options_from_args(args: argparse.Namespace) -> Options:
    from .leader import LeaseTiming
    from .operator import Options

    try:
        lease = LeaseTiming(args.leader_elect_lease_duration, args.leader_elect_renew_deadline,
                            args.leader_elect_retry_period)
    except ValueError as e:
        raise InputError(str(e)) from None
    if args.workers < 1:
        raise InputError("--workers must be at least 1")
    if args.kube_api_burst < 1:
        raise InputError("--kube-api-burst must be at least 1")
    if args.kube_api_in_flight < 0:
        raise InputError("--kube-api-in-flight must be 0 (no limit) or more")
    if args.watch_timeout < 1:
        raise InputError("--watch-timeout must be at least 1 second")
    return Options(
        kubeconfig=args.kubeconfig,
        namespaces=tuple(ns.strip() for ns in args.namespaces.split(",") if ns.strip()),
        settings=settings_from_args(args),
        workers=args.workers,
        resync_seconds=args.resync_period,
        metrics_address=args.metrics_bind_address,
        health_address=args.health_probe_bind_address,
        leader_elect=args.leader_elect,
        leader_election_id=args.leader_election_id,
        leader_election_namespace=args.leader_election_namespace,
        lease=lease,
        kube_api_qps=args.kube_api_qps,
        kube_api_burst=args.kube_api_burst,
        kube_api_in_flight=args.kube_api_in_flight,
        watch_timeout=args.watch_timeout,
        log_level=args.log_level,
        log_format=args.log_format,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kaos-modelapi", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kaos-modelapi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="print the children the operator would create for each ModelAPI")
    r.add_argument("-f", "--filename", required=True, help="YAML file with ModelAPIs ('-' for stdin)")
    add_settings_flags(r)
    sub.add_parser("crd", help="print the ModelAPI CustomResourceDefinition")
    add_run_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "render":
            render(args, sys.stdout)
        elif args.command == "crd":
            sys.stdout.write(crd.crd_yaml())
        else:
            from .operator import StartupError, run_command  # render and crd need no Kubernetes client

            try:
                return run_command(options_from_args(args))
            except StartupError as e:
                print(f"error: {e}", file=sys.stderr)
                return EXIT_STARTUP
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0
