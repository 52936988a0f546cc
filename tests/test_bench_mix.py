"""The benchmark's peer mixes (BENCH_MIX, e2e/bench/manifests.py): what this CRD accepts and what an update rolls.

The `peer` mix is measured on this operator against KAOS's Go operator, which gets the same ModelAPIs spelled for
its CRD (`peer-kaos`); the comparison only holds if both are the same ModelAPIs and the update rolls every one.
"""

from __future__ import annotations

import pytest

from e2e.bench import manifests
from kaos_modelapi import desired
from kaos_modelapi.api import ModelAPI
from kaos_modelapi.settings import GatewayRef, Settings

SETTINGS = Settings(gateway=GatewayRef("bench-gateway", "kaos-bench"))


def template(doc: dict[str, object]) -> object:
    doc["metadata"]["uid"] = "uid-1"  # type: ignore[index]
    built = desired.build(ModelAPI.model_validate(doc), SETTINGS).children
    return next(c for c in built if c["kind"] == "Deployment")["spec"]["template"]


def test_default_mix_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_MIX", raising=False)
    assert [manifests.variant(i) for i in range(10)] == list(manifests.VARIANTS)


def test_peer_mix_is_half_mock_proxy_half_hosted_and_every_update_rolls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_MIX", "peer")
    docs, updated = manifests.modelapis(10, "ns"), manifests.modelapis(10, "ns", revision=1)
    assert [d["spec"]["mode"] for d in docs] == ["Proxy", "Hosted"] * 5
    assert all(d["spec"]["proxyConfig"] == {"model": f"gpt-mock-{i}"} for i, d in enumerate(docs) if i % 2 == 0)
    for before, after in zip(docs, updated, strict=True):
        assert template(before) != template(after), after  # this CRD accepts both; the pod template changes


def test_peer_kaos_is_the_same_modelapis_in_kaos_spelling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_MIX", "peer")
    ours = manifests.modelapis(4, "ns", revision=2)
    monkeypatch.setenv("BENCH_MIX", "peer-kaos")
    theirs = manifests.modelapis(4, "ns", revision=2)
    for a, b in zip(ours, theirs, strict=True):
        if a["spec"]["mode"] == "Proxy":
            assert b["spec"]["proxyConfig"] == {"models": [a["spec"]["proxyConfig"]["model"]]}
            b["spec"]["proxyConfig"] = a["spec"]["proxyConfig"]
        assert a == b


def test_unknown_mix_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENCH_MIX", "kaos")
    with pytest.raises(ValueError, match="BENCH_MIX"):
        manifests.modelapis(1, "ns")
