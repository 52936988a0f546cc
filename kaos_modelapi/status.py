"""The status of a ModelAPI, computed from what was built and what the caches hold. Pure."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from . import ollama
from .api import ModelAPI
from .desired import CONTAINER, INIT_CONTAINER, Desired, SecretRef, SpecError, selector_labels

# Container states that will not heal by waiting: the user has to look (and the message says where).
# The container never started because its image could not be had: its logs are empty, describe says why.
_IMAGE_WAIT_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
_FAILING_WAIT_REASONS = frozenset({
    "CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff", "InvalidImageName",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})


# --- pull progress ------------------------------------------------------------------------------------------
# While a model is pulled the reconciler reads the tail of the pull-model container's log (the lines
# ollama.PROGRESS_AWK prints) every PULL_POLL_SECONDS; the status message shows the progress, rewritten only
# when it moved PROGRESS_STEP points, so a long pull costs about ten status writes.

PULL_POLL_SECONDS = 10.0
PROGRESS_STEP = 10
PULLING = "PullingModel"
CREATING = "Creating"  # the first reconcile: children sent, no Deployment in the cache yet
PODS_NOT_READY = "PodsNotReady"
LOADING = "LoadingModel"
AVAILABLE = "Available"
ROLLING_OUT = "RollingOut"
PARTLY_READY = "PodsPartlyReady"  # some pods serve, not all the Deployment wants
# Where every new ModelAPI starts: a first status saying so is no news (just_created). (A pull, minutes long,
# and the model's loading are: each has its Event.)
ON_THE_WAY = frozenset({CREATING, PODS_NOT_READY})
_SIZE = r"[0-9.]+ [KMGT]?B"
_PROGRESS_LINE = re.compile(rf"^{re.escape(ollama.PROGRESS_PREFIX)}(\d{{1,3}})% ({_SIZE})/({_SIZE})\s*$")
# The progress as the status message shows it: "pulling model M: 42% (57/135 MB)".
_SHOWN = re.compile(r": (\d{1,3})% \(([^()]*)\)")
# The Deployment's pod counts in the messages of these reasons ("2 of 3 pods ready", "(1/3)"): like the counters
# status.deployment mirrors, they move with every pod that starts or rolls and say no new state.
_COUNTED = frozenset({AVAILABLE, ROLLING_OUT, PARTLY_READY, PODS_NOT_READY})
_COUNTS = re.compile(r"\d+ of \d+ pods|\(\d+/\d+\)")


@dataclass(frozen=True)
class PullProgress:
    """Ollama's percent of the model's largest layer, and its sizes as Ollama writes them ("57 MB")."""

    percent: int
    done: str
    total: str

    def __str__(self) -> str:
        done, _, unit = self.done.partition(" ")
        sizes = f"{done}/{self.total}" if self.total.endswith(f" {unit}") else f"{self.done}/{self.total}"
        return f"{self.percent}% ({sizes})"


def parse_progress(log_tail: str) -> PullProgress | None:
    """The last progress line of a pull-model log's tail, if any."""
    for line in reversed(log_tail.splitlines()):
        if (m := _PROGRESS_LINE.match(line)) and int(m[1]) <= 100:
            return PullProgress(int(m[1]), m[2], m[3])
    return None


def _shown_progress(message: str) -> tuple[int, str] | None:
    """(percent, its text) of the progress a stored PullingModel message shows."""
    m = _SHOWN.search(message)
    return (int(m[1]), m[0]) if m else None


def progress_text(previous: tuple[int, str] | None, new: PullProgress | None) -> str:
    """What the message shows after "pulling model M": the new progress when it moved at least PROGRESS_STEP
    points (or finished, or went back: a new pod starts again), else what is shown already, so that the
    status is not rewritten for every percent; nothing before the first progress line."""
    if new is None:
        return previous[1] if previous else ""
    if previous is not None and previous[0] <= new.percent < min(previous[0] + PROGRESS_STEP, 100):
        return previous[1]
    return f": {new}"


def _without_progress(message: str) -> str:
    return _SHOWN.sub("", message, count=1)


@dataclass(frozen=True)
class Observed:
    """What the caches say about a ModelAPI's world."""

    deployment: dict[str, Any] | None = None
    pods: tuple[dict[str, Any], ...] = ()
    missing_secrets: tuple[SecretRef, ...] = ()
    # Problems the operator detected that do not stop the endpoint from serving (e.g. no HTTPRoute CRD).
    warnings: tuple[str, ...] = ()
    # Pod name -> the progress its pull-model log shows (read only for the pod `pulling_pod` names).
    pulls: Mapping[str, PullProgress] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    phase: str
    reason: str
    message: str
    pulling: str | None = None  # the pod pulling the model the message speaks of, if any: its progress is shown

    @property
    def ready(self) -> bool:
        return self.phase == "Ready"


def _condition(deployment: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in deployment.get("status", {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return {}


def _logs_hint(m: ModelAPI, container: str) -> str:
    return f"kubectl logs -n {m.metadata.namespace} -l modelapi={m.metadata.name} -c {container}"


def _container_failure(status: dict[str, Any]) -> str | None:
    state = status.get("state") or {}
    waiting, terminated = state.get("waiting") or {}, state.get("terminated") or {}
    last = (status.get("lastState") or {}).get("terminated") or {}
    if waiting.get("reason") in _FAILING_WAIT_REASONS:
        code = last.get("exitCode")
        detail = f" (last exit code {code})" if code is not None else ""
        return f"{waiting['reason']}{detail}"
    if terminated and terminated.get("exitCode", 0) != 0:
        return f"exited with code {terminated['exitCode']}"
    return None


def _unschedulable(status: dict[str, Any]) -> str | None:
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            return str(c.get("message") or "no node fits the pod")
    return None


def _image_failure(m: ModelAPI, status: dict[str, Any]) -> Verdict | None:
    for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in _IMAGE_WAIT_REASONS:
            return Verdict("Failed", "ImagePullFailed",
                           f"container {container.get('name')} cannot start: image {container.get('image')} "
                           f"cannot be pulled ({waiting['reason']}); see kubectl describe pod -n "
                           f"{m.metadata.namespace} -l modelapi={m.metadata.name}")
    return None


def _pod_verdict(m: ModelAPI, pod: dict[str, Any]) -> Verdict | None:
    """A verdict for a pod that is failing, unschedulable or still pulling its model; None when it tells
    nothing."""
    status = pod.get("status") or {}
    if (why := _unschedulable(status)) is not None:
        return Verdict("Pending", "Unschedulable", f"pod cannot be scheduled: {why}")
    if (image := _image_failure(m, status)) is not None:
        return image
    for init in status.get("initContainerStatuses") or []:
        failure = _container_failure(init)
        if failure and init.get("name") == INIT_CONTAINER and m.spec.hostedConfig:
            return Verdict("Failed", "ModelPullFailed",
                           f"pulling model {m.spec.hostedConfig.model} failed: {failure}; see "
                           f"{_logs_hint(m, INIT_CONTAINER)}")
        if failure:
            return Verdict("Failed", "ContainerFailing",
                           f"init container {init.get('name')} {failure}; see {_logs_hint(m, init.get('name', ''))}")
        if "running" in (init.get("state") or {}) and init.get("name") == INIT_CONTAINER and m.spec.hostedConfig:
            return Verdict("Pending", PULLING, f"pulling model {m.spec.hostedConfig.model}",
                           pulling=pod.get("metadata", {}).get("name"))
    for container in status.get("containerStatuses") or []:
        failure = _container_failure(container)
        if failure:
            name = container.get("name", CONTAINER)
            return Verdict("Failed", "ContainerFailing",
                           f"container {name} is failing: {failure}; see {_logs_hint(m, name)} --previous")
    return None


def _deployment_verdict(m: ModelAPI, deployment: dict[str, Any], pods: tuple[dict[str, Any], ...]) -> Verdict:
    st = deployment.get("status") or {}
    wanted = (deployment.get("spec") or {}).get("replicas", 1)
    ready, updated = st.get("readyReplicas", 0), st.get("updatedReplicas", 0)
    available = _condition(deployment, "Available").get("status") == "True"
    if available and ready > 0:
        # A roll is pods of an older template still running; fewer pods, or more, of the current one than wanted
        # is a scale that the Deployment controller has not caught up with (the counts are its last ones).
        if updated >= st.get("replicas", 0):
            return Verdict("Ready", AVAILABLE, f"{min(ready, wanted)} of {wanted} pods ready")
        serving = Verdict("Ready", ROLLING_OUT, f"rolling out: {updated} of {wanted} pods updated")
    elif wanted == 0:
        return Verdict("Pending", "ScaledToZero", "the Deployment is scaled to 0 replicas")
    else:  # (not Available: with maxUnavailable 0, that takes every pod the Deployment wants)
        serving = Verdict("Ready", PARTLY_READY, f"{ready} of {wanted} pods ready")
    waiting = _waiting_verdict(m, deployment, pods, ready, wanted)
    if ready == 0:
        return waiting
    # Some pods serve while the others start, roll or fail (a scale-up, a roll, a pod replaced): the endpoint
    # answers, so Ready; and why not all are, unless they are only on their way.
    if waiting.reason == PODS_NOT_READY:
        return serving
    return replace(serving, message=f"{serving.message}; {waiting.message}", pulling=waiting.pulling)


def _waiting_verdict(m: ModelAPI, deployment: dict[str, Any], pods: tuple[dict[str, Any], ...], ready: int,
                     wanted: int) -> Verdict:
    """Why the Deployment's pods are not all ready."""
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    for pod in live:
        verdict = _pod_verdict(m, pod)
        if verdict is not None:
            return verdict
    if (refused := _replica_failure(m, deployment)) is not None:
        return refused
    progressing = _condition(deployment, "Progressing")
    if progressing.get("status") == "False":
        return Verdict("Failed", progressing.get("reason") or "ProgressDeadlineExceeded",
                       progressing.get("message") or "the Deployment is not making progress")
    if m.spec.mode == "Hosted" and m.spec.hostedConfig and any(_loading(p) for p in live):
        return Verdict("Pending", LOADING, f"loading model {m.spec.hostedConfig.model} into memory")
    return Verdict("Pending", PODS_NOT_READY, f"waiting for pods to become ready ({ready}/{wanted})")


def _replica_failure(m: ModelAPI, deployment: dict[str, Any]) -> Verdict | None:
    """The API server refuses the pods themselves (the namespace's Pod Security level, a quota): there is no
    pod to look at, only the ReplicaSet's error, which the Deployment copies into this condition."""
    failure = _condition(deployment, "ReplicaFailure")
    if failure.get("status") != "True":
        return None
    return Verdict("Failed", failure.get("reason") or "FailedCreate",
                   f"pods cannot be created: {failure.get('message') or 'refused'}; see kubectl describe "
                   f"replicaset -n {m.metadata.namespace} -l modelapi={m.metadata.name}")


def _loading(pod: dict[str, Any]) -> bool:
    """The model is pulled and the server runs, but its readiness probe (the model loaded) has not passed."""
    status = pod.get("status") or {}
    pulled = any(i.get("name") == INIT_CONTAINER
                 and ((i.get("state") or {}).get("terminated") or {}).get("exitCode") == 0
                 for i in status.get("initContainerStatuses") or [])
    serving = any(c.get("name") == CONTAINER and "running" in (c.get("state") or {}) and not c.get("ready")
                  for c in status.get("containerStatuses") or [])
    return pulled and serving


def verdict(m: ModelAPI, built: Desired | SpecError, observed: Observed) -> Verdict:
    if isinstance(built, SpecError):
        return Verdict("Failed", built.reason, built.message)
    if observed.missing_secrets:
        ref = observed.missing_secrets[0]
        return Verdict("Pending", "SecretNotFound",
                       f"waiting for Secret {ref.name} ({ref.why}) in namespace {m.metadata.namespace}")
    if observed.deployment is None:
        return Verdict("Pending", CREATING, f"creating Deployment modelapi-{m.metadata.name}")
    return _deployment_verdict(m, observed.deployment, observed.pods)


def pulling_pod(m: ModelAPI, built: Desired | SpecError, observed: Observed) -> str | None:
    """The pod whose pull-model log to read: the one the status says is pulling the model, if any (the only
    pod, or a new one beside pods that serve: a scale-up, a roll)."""
    return verdict(m, built, observed).pulling


def _with_progress(v: Verdict, observed: Observed, previous: Mapping[str, Any]) -> Verdict:
    if v.pulling is None:
        return v
    before = ready_of(previous)
    shown = _shown_progress(str(before.get("message") or "")) if before.get("reason") == v.reason else None
    text = progress_text(shown, observed.pulls.get(v.pulling))
    return replace(v, message=v.message + text)


def _deployment_mirror(deployment: dict[str, Any] | None) -> dict[str, Any] | None:
    if deployment is None:
        return None
    st = deployment.get("status") or {}
    keep = ("type", "status", "reason", "message", "lastUpdateTime", "lastTransitionTime")
    return {
        "replicas": st.get("replicas", 0),
        "readyReplicas": st.get("readyReplicas", 0),
        "availableReplicas": st.get("availableReplicas", 0),
        "updatedReplicas": st.get("updatedReplicas", 0),
        "conditions": [{k: c[k] for k in keep if k in c} for c in st.get("conditions") or []],
    }


def ready_of(status: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The Ready condition of a stored status ({} when there is none)."""
    conditions = (status or {}).get("conditions") or []
    return next((c for c in conditions if isinstance(c, Mapping) and c.get("type") == "Ready"), {})


def ready_condition(previous: Mapping[str, Any], v: Verdict, generation: int | None, now: str) -> dict[str, Any]:
    """The Ready condition for verdict `v`, given the stored one (`previous`)."""
    status = "True" if v.ready else "False"
    # lastTransitionTime moves only when the status flips: a changing message is not a transition.
    since = previous.get("lastTransitionTime") if previous.get("status") == status else None
    return {"type": "Ready", "status": status, "reason": v.reason, "message": v.message,
            "lastTransitionTime": since or now, "observedGeneration": generation}


def ready_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether the Ready condition says something new (what an Event reports): not a pull's progress (it would
    be an Event every PROGRESS_STEP points) nor the pods counted so far (one a pod, on every start or roll)."""
    before, after = ready_of(old), ready_of(new)
    if any(before.get(k) != after.get(k) for k in ("status", "reason")):
        return True
    return _news(before) != _news(after)


def _news(ready: Mapping[str, Any]) -> str:
    return _without_counts(ready, _without_progress(str(ready.get("message"))))


def _without_counts(ready: Mapping[str, Any], message: str) -> str:
    """`message` without its pod counts, if the Ready condition `ready` has a reason whose message has them."""
    return _COUNTS.sub("#", message) if ready.get("reason") in _COUNTED else message


def just_created(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether `new` is a ModelAPI's first status and says only that it is starting (its children being
    created, its pods not ready yet): what the user who just applied it knows already, so no Event (one per
    ModelAPI created, a tenth of a cold converge's writes). A first status that says more (a missing Secret,
    an unschedulable pod, a model pulled, Failed, Ready) is news, and so is every later change."""
    after = ready_of(new)
    return not ready_of(old) and after.get("status") == "False" and after.get("reason") in ON_THE_WAY


# What copies the Deployment's counters and conditions (the scale subresource's replicas, kubectl's READY
# column, status.deployment): they move several times while pods start or roll, and say no new state.
MIRRORED = frozenset({"deployment", "replicas", "readiness"})


def mirror_only(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether `new` differs from the stored status `old` only in what mirrors the Deployment (its counters, and
    the pod counts in the message)."""
    return bool(old) and old != new and _unmirrored(old) == _unmirrored(new)


def _unmirrored(st: Mapping[str, Any]) -> dict[str, Any]:
    ready = ready_of(st)
    kept = {k: v for k, v in st.items() if k not in MIRRORED}
    if ready.get("reason") in _COUNTED:
        kept["message"] = _without_counts(ready, str(st.get("message")))
        kept["conditions"] = [{**c, "message": _without_counts(ready, str(c.get("message")))} if c is ready else c
                              for c in st.get("conditions") or []]
    return kept


def only_creating(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether `new` is a ModelAPI's first status and says only that its Deployment is being created: not
    worth a write, since the Deployment the same reconcile just applied wakes the next one as soon as the
    cache holds it, which writes what it finds (a Pending status, once, instead of two on the way to Ready)."""
    return not ready_of(old) and ready_of(new).get("reason") == CREATING


def _stored(m: ModelAPI) -> dict[str, Any]:
    return {"conditions": [c.model_dump(exclude_none=True) for c in m.status.conditions]} if m.status else {}


def unreadable(obj: Mapping[str, Any], error: SpecError, now: str) -> dict[str, Any]:
    """The status of an object the models cannot read (e.g. stored by an older CRD version)."""
    generation = obj["metadata"].get("generation")
    v = Verdict("Failed", error.reason, error.message)
    return {
        "phase": v.phase, "ready": False, "endpoint": "", "model": "", "message": v.message,
        "observedGeneration": generation,
        "conditions": [ready_condition(ready_of(obj.get("status")), v, generation, now)],
    }


def compute(m: ModelAPI, built: Desired | SpecError, observed: Observed, now: str,
            previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full status to apply. `now` (RFC 3339) is used only for a condition that changes status;
    `previous` is the stored status (default: the model's)."""
    stored = previous if previous is not None else _stored(m)
    v = _with_progress(verdict(m, built, observed), observed, stored)
    notes = (*(built.notes if isinstance(built, Desired) else ()), *observed.warnings)
    message = "; ".join((v.message, *notes))
    v = Verdict(v.phase, v.reason, message)
    status: dict[str, Any] = {
        "phase": v.phase,
        "ready": v.ready,
        "endpoint": built.endpoint if isinstance(built, Desired) else "",
        "model": built.model if isinstance(built, Desired) else "",
        "message": message,
        "observedGeneration": m.metadata.generation,
        "conditions": [ready_condition(ready_of(stored), v, m.metadata.generation, now)],
    }
    status.update(_scale(m, observed.deployment))
    mirror = _deployment_mirror(observed.deployment)
    if mirror is not None:
        status["deployment"] = mirror
    return status


def _scale(m: ModelAPI, deployment: dict[str, Any] | None) -> dict[str, Any]:
    """What the scale subresource reads (replicas, selector) and kubectl get's READY column (ready/desired)."""
    st = (deployment or {}).get("status") or {}
    wanted = ((deployment or {}).get("spec") or {}).get("replicas", m.spec.replicas if m.spec.replicas is not None
                                                          else 1)
    selector = ",".join(f"{k}={v}" for k, v in selector_labels(m.metadata.name).items())
    return {"replicas": st.get("replicas", 0), "selector": selector,
            "readiness": f"{st.get('readyReplicas', 0)}/{wanted}"}
