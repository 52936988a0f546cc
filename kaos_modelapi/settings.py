"""Operator settings that change what the desired-state builder produces."""

from __future__ import annotations

from dataclasses import dataclass

from . import litellm, ollama


@dataclass(frozen=True)
class GatewayRef:
    """The Gateway that every ModelAPI's HTTPRoute attaches to."""

    name: str
    namespace: str
    section_name: str | None = None


@dataclass(frozen=True)
class Settings:
    litellm_image: str = litellm.DEFAULT_IMAGE
    ollama_image: str = ollama.DEFAULT_IMAGE
    gateway: GatewayRef | None = None
    cluster_domain: str = "cluster.local"
