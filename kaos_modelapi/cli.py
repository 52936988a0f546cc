"""The `kaos-modelapi` command: `render` and `crd` work offline; `run` is the operator."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import pydantic
import yaml

from . import __version__, crd, desired, yamlio
from .api import ModelAPI
from .settings import GatewayRef, Settings

EXIT_USAGE = 2


class InputError(Exception):
    """A file that is not a valid ModelAPI: printed as one line, exit status 2."""


def describe_validation_error(error: pydantic.ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def parse_modelapi(doc: Any, origin: str) -> ModelAPI:
    if not isinstance(doc, dict):
        raise InputError(f"{origin}: not a Kubernetes object")
    if doc.get("kind") != "ModelAPI":
        raise InputError(f"{origin}: kind is {doc.get('kind')!r}, expected ModelAPI")
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
    objects: list[dict[str, Any]] = []
    for m in modelapis:
        try:
            objects += desired.build(m, settings).children
        except desired.SpecError as e:
            raise InputError(f"{args.filename}: ModelAPI {m.metadata.name}: {e.message}") from None
    yamlio.dump_all(objects, out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kaos-modelapi", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kaos-modelapi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("render", help="print the children the operator would create for each ModelAPI")
    r.add_argument("-f", "--filename", required=True, help="YAML file with ModelAPIs ('-' for stdin)")
    add_settings_flags(r)
    sub.add_parser("crd", help="print the ModelAPI CustomResourceDefinition")
    from .operator import add_run_parser  # the operator's flags live with the operator

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
            return int(args.run(args))
    except (InputError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0
