"""Status for each Deployment and pod state: phase, ready, message and the Ready condition."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from kaos_modelapi import controller, desired, status
from kaos_modelapi.api import ModelAPI
from kaos_modelapi.desired import SecretRef, SpecError
from kaos_modelapi.settings import Settings

NOW = "2026-11-26T10:00:00Z"
EARLIER = "2026-11-26T09:00:00Z"


def modelapi(spec: dict[str, Any], conditions: list[dict[str, Any]] | None = None) -> ModelAPI:
    obj: dict[str, Any] = {"metadata": {"name": "m", "namespace": "ns", "uid": "u", "generation": 4}, "spec": spec}
    if conditions is not None:
        obj["status"] = {"conditions": conditions}
    return ModelAPI.model_validate(obj)


HOSTED = modelapi({"mode": "Hosted", "hostedConfig": {"model": "smollm2:135m"}})
MOCK = modelapi({"mode": "Proxy", "proxyConfig": {"model": "gpt-4o-mini"}})


def deployment(replicas: int = 1, ready: int = 0, updated: int = 1, available: bool = False,
               progressing: dict[str, str] | None = None) -> dict[str, Any]:
    conditions = [{"type": "Available", "status": "True" if available else "False",
                   "lastUpdateTime": EARLIER, "lastTransitionTime": EARLIER, "reason": "r", "message": "m"}]
    if progressing:
        conditions.append({"type": "Progressing", **progressing})
    return {"spec": {"replicas": replicas},
            "status": {"replicas": replicas, "readyReplicas": ready, "availableReplicas": ready,
                       "updatedReplicas": updated, "conditions": conditions}}


def pod(init: list[dict[str, Any]] | None = None, containers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "status": {"initContainerStatuses": init or [],
                                                  "containerStatuses": containers or []}}


def compute(m: ModelAPI, observed: status.Observed) -> dict[str, Any]:
    """The status, from pods as the operator caches them (so every state a test sets survives the cache)."""
    cached = tuple(controller.pod_status_only(p) for p in observed.pods)
    return status.compute(m, desired.build(m, Settings()), replace(observed, pods=cached), NOW)


def test_ready_when_the_deployment_is_available() -> None:
    st = compute(MOCK, status.Observed(deployment(ready=1, available=True)))
    assert (st["phase"], st["ready"]) == ("Ready", True)
    assert st["endpoint"] == "http://modelapi-m.ns.svc.cluster.local:8000"
    assert st["observedGeneration"] == 4
    assert st["deployment"]["availableReplicas"] == 1
    assert st["deployment"]["conditions"][0]["type"] == "Available"
    (condition,) = st["conditions"]
    assert condition == {"type": "Ready", "status": "True", "reason": "Available", "message": "1 of 1 pods ready",
                         "lastTransitionTime": NOW, "observedGeneration": 4}


def test_still_ready_while_rolling_out() -> None:
    st = compute(MOCK, status.Observed(deployment(replicas=1, ready=1, updated=0, available=True)))
    assert st["phase"] == "Ready"
    assert st["conditions"][0]["reason"] == "RollingOut"


def test_pending_before_the_deployment_exists() -> None:
    st = compute(MOCK, status.Observed())
    assert (st["phase"], st["ready"]) == ("Pending", False)
    assert st["message"] == "creating Deployment modelapi-m"


def test_pending_while_pulling_the_model() -> None:
    running = {"name": "pull-model", "state": {"running": {"startedAt": NOW}}}
    st = compute(HOSTED, status.Observed(deployment(), (pod(init=[running]),)))
    assert st["phase"] == "Pending"
    assert st["message"] == "pulling model smollm2:135m"
    assert st["conditions"][0]["reason"] == "PullingModel"


def test_failed_pull_says_where_to_look() -> None:
    failed = {"name": "pull-model", "state": {"terminated": {"exitCode": 1}}}
    st = compute(HOSTED, status.Observed(deployment(), (pod(init=[failed]),)))
    assert st["phase"] == "Failed"
    assert st["conditions"][0]["reason"] == "ModelPullFailed"
    assert "kubectl logs -n ns -l modelapi=m -c pull-model" in st["message"]


def test_crash_looping_container_is_failed() -> None:
    crashing = {"name": "model-api", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 3}}}
    st = compute(MOCK, status.Observed(deployment(), (pod(containers=[crashing]),)))
    assert st["phase"] == "Failed"
    assert "CrashLoopBackOff (last exit code 3)" in st["message"]


def test_terminating_pods_are_ignored() -> None:
    crashing = {"name": "model-api", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}
    old = pod(containers=[crashing])
    old["metadata"]["deletionTimestamp"] = NOW
    assert compute(MOCK, status.Observed(deployment(), (old,)))["phase"] == "Pending"


def test_progress_deadline_exceeded_is_failed() -> None:
    stuck = {"status": "False", "reason": "ProgressDeadlineExceeded", "message": "too slow"}
    st = compute(MOCK, status.Observed(deployment(progressing=stuck)))
    assert (st["phase"], st["message"]) == ("Failed", "too slow")


def test_pods_the_api_server_refuses_are_failed_with_its_message() -> None:
    """E.g. a Hosted ModelAPI (root) in a namespace that enforces the restricted Pod Security Standard."""
    refused = deployment(progressing={"status": "True", "reason": "ReplicaSetUpdated", "message": "m"})
    why = 'pods "modelapi-m-5d9c8" is forbidden: violates PodSecurity "restricted:latest": runAsNonRoot != true'
    refused["status"]["conditions"].append({"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                                            "message": why})
    st = compute(HOSTED, status.Observed(refused))
    assert (st["phase"], st["conditions"][0]["reason"]) == ("Failed", "FailedCreate")
    assert why in st["message"] and "kubectl describe replicaset -n ns -l modelapi=m" in st["message"]


def test_scaled_to_zero_is_pending() -> None:
    st = compute(MOCK, status.Observed(deployment(replicas=0, updated=0)))
    assert st["phase"] == "Pending" and "scaled to 0" in st["message"]


def test_missing_secret_is_pending_and_named() -> None:
    st = compute(MOCK, status.Observed(deployment(ready=1, available=True),
                                       missing_secrets=(SecretRef("creds", "env API_KEY"),)))
    assert st["phase"] == "Pending"
    assert st["message"] == "waiting for Secret creds (env API_KEY) in namespace ns"
    assert st["conditions"][0]["reason"] == "SecretNotFound"


def test_spec_error_is_failed_with_its_reason() -> None:
    st = status.compute(MOCK, SpecError("InvalidPodSpec", "spec.podSpec cannot be applied: x"), status.Observed(),
                        NOW)
    assert (st["phase"], st["ready"], st["endpoint"]) == ("Failed", False, "")
    assert st["conditions"][0]["reason"] == "InvalidPodSpec"


def test_warnings_and_notes_are_appended_to_the_message() -> None:
    m = modelapi({"mode": "Proxy", "proxyConfig": {"model": "x", "configYaml": {"fromString": "model_list: []"}}})
    st = compute(m, status.Observed(deployment(ready=1, available=True), warnings=("no HTTPRoute API",)))
    assert st["message"] == ("1 of 1 pods ready; proxyConfig.apiBase and proxyConfig.model are ignored because "
                             "configYaml is set; no HTTPRoute API")


def test_transition_time_moves_only_when_the_status_flips() -> None:
    previous = [{"type": "Ready", "status": "True", "reason": "Available", "message": "old",
                 "lastTransitionTime": EARLIER}]
    m = modelapi({"mode": "Proxy", "proxyConfig": {"model": "x"}}, previous)
    still_ready = compute(m, status.Observed(deployment(ready=1, available=True)))
    assert still_ready["conditions"][0]["lastTransitionTime"] == EARLIER
    now_pending = compute(m, status.Observed(deployment()))
    assert now_pending["conditions"][0]["lastTransitionTime"] == NOW


def test_the_same_state_gives_the_same_status() -> None:
    observed = status.Observed(deployment(ready=1, available=True))
    assert compute(MOCK, observed) == compute(MOCK, observed)


def test_unschedulable_pod_is_pending_with_the_scheduler_message() -> None:
    unschedulable = pod()
    unschedulable["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                              "message": "0/1 nodes have nvidia.com/gpu"}]
    st = compute(HOSTED, status.Observed(deployment(), (unschedulable,)))
    assert (st["phase"], st["conditions"][0]["reason"]) == ("Pending", "Unschedulable")
    assert st["message"] == "pod cannot be scheduled: 0/1 nodes have nvidia.com/gpu"


def test_scale_fields_say_pods_and_selector_and_ready_of_desired() -> None:
    st = compute(MOCK, status.Observed(deployment(replicas=3, ready=2, updated=3, available=True)))
    assert (st["replicas"], st["selector"], st["readiness"]) == (3, "app=modelapi,modelapi=m", "2/3")
    assert compute(MOCK, status.Observed())["readiness"] == "0/1"
    scaled = modelapi({"mode": "Proxy", "proxyConfig": {"model": "x"}, "replicas": 4})
    assert compute(scaled, status.Observed())["readiness"] == "0/4"


def test_a_pull_that_outlasts_the_progress_deadline_is_still_pulling() -> None:
    # A large model on a slow link: the Deployment gives up on progress (600 s by default), the pull goes on.
    running = {"name": "pull-model", "state": {"running": {"startedAt": EARLIER}}}
    stuck = {"status": "False", "reason": "ProgressDeadlineExceeded",
             "message": 'ReplicaSet "modelapi-m-1" has timed out progressing.'}
    st = compute(HOSTED, status.Observed(deployment(progressing=stuck), (pod(init=[running]),)))
    assert (st["phase"], st["conditions"][0]["reason"]) == ("Pending", "PullingModel")
    assert st["message"] == "pulling model smollm2:135m"


def test_loading_the_model_after_the_pull() -> None:
    pulled = {"name": "pull-model", "state": {"terminated": {"exitCode": 0}}}
    serving = {"name": "model-api", "state": {"running": {"startedAt": NOW}}, "ready": False}
    st = compute(HOSTED, status.Observed(deployment(), (pod(init=[pulled], containers=[serving]),)))
    assert (st["phase"], st["conditions"][0]["reason"]) == ("Pending", "LoadingModel")
    assert st["message"] == "loading model smollm2:135m into memory"
    # A Proxy pod in the same state is just not ready yet.
    st = compute(MOCK, status.Observed(deployment(), (pod(containers=[serving]),)))
    assert st["conditions"][0]["reason"] == "PodsNotReady"


def test_an_image_that_cannot_be_pulled_is_named_not_blamed_on_the_model() -> None:
    waiting = {"name": "pull-model", "image": "docker.io/ollama/ollama:0.12.6",
               "state": {"waiting": {"reason": "ImagePullBackOff"}}}
    pods = ({"metadata": {"name": "p"}, "status": {"initContainerStatuses": [waiting]}},)
    st = compute(HOSTED, status.Observed(deployment(), pods))
    assert (st["phase"], st["conditions"][0]["reason"]) == ("Failed", "ImagePullFailed")
    assert "docker.io/ollama/ollama:0.12.6" in st["message"] and "kubectl describe pod" in st["message"]



# --- pull progress ------------------------------------------------------------------------------------------

PULLING_POD = pod(init=[{"name": "pull-model", "state": {"running": {"startedAt": EARLIER}}}])
# What ollama.PROGRESS_AWK makes of `ollama pull`'s output, among the lines of Ollama's own server.
LOG = """pull-model: pulling smollm2:135m
time=2026-11-27T17:14:21.708Z level=INFO source=download.go:177 msg="downloading 4f659a1e86d7 in 2 part(s)"
pulling manifest
pull-model: progress 41% 55 MB/135 MB
pull-model: progress 42% 57 MB/135 MB
time=2026-11-27T17:14:29.008Z level=INFO source=download.go:295 msg="4f659a1e86d7 part 1 stalled; retrying"
"""


def pulling(progress: status.PullProgress | None, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    pulls = {"p": progress} if progress is not None else {}
    observed = status.Observed(deployment(), (PULLING_POD,), pulls=pulls)
    return status.compute(HOSTED, desired.build(HOSTED, Settings()), observed, NOW, previous)


def test_the_last_progress_line_of_the_log_tail_is_the_progress() -> None:
    assert status.parse_progress(LOG) == status.PullProgress(42, "57 MB", "135 MB")
    assert status.parse_progress("pull-model: progress 100% 1.2 GB/1.2 GB\nsuccess\n") == status.PullProgress(
        100, "1.2 GB", "1.2 GB")
    assert status.parse_progress("pull-model: progress 3% 512 B/4.1 GB") == status.PullProgress(3, "512 B", "4.1 GB")


def test_no_or_garbled_progress_lines_give_no_progress() -> None:
    for tail in ("", "pull-model: pulling x\npulling manifest\n", "pull-model: progress 142% 1 MB/2 MB",
                 "pull-model: progress 42% 57 MB", "pull-model: progress 42%57 MB/135 MB",
                 "\x1b[?25lpulling 4f659a1e86d7:  42% \u2595\u2588 \u258f  57 MB/135 MB\x1b[K",
                 "xpull-model: progress 42% 57 MB/135 MB"):
        assert status.parse_progress(tail) is None, tail


def test_the_pod_to_read_is_the_one_pulling_and_only_while_it_pulls() -> None:
    built = desired.build(HOSTED, Settings())
    assert status.pulling_pod(HOSTED, built, status.Observed(deployment(), (PULLING_POD,))) == "p"
    pulled = pod(init=[{"name": "pull-model", "state": {"terminated": {"exitCode": 0}}}])
    assert status.pulling_pod(HOSTED, built, status.Observed(deployment(), (pulled,))) is None
    assert status.pulling_pod(HOSTED, built, status.Observed(deployment(ready=1, available=True),
                                                             (PULLING_POD,))) is None  # a roll's new pod
    assert status.pulling_pod(MOCK, desired.build(MOCK, Settings()), status.Observed(deployment(), ())) is None


def test_the_message_shows_the_progress_in_ollamas_units() -> None:
    st = pulling(status.PullProgress(42, "57 MB", "135 MB"))
    assert (st["phase"], st["conditions"][0]["reason"]) == ("Pending", "PullingModel")
    assert st["message"] == st["conditions"][0]["message"] == "pulling model smollm2:135m: 42% (57/135 MB)"
    assert pulling(status.PullProgress(3, "950 KB", "1.2 GB"))["message"] == \
        "pulling model smollm2:135m: 3% (950 KB/1.2 GB)"
    assert pulling(None)["message"] == "pulling model smollm2:135m"


def test_the_shown_progress_moves_only_in_steps_so_the_status_is_rarely_rewritten() -> None:
    st = pulling(status.PullProgress(42, "57 MB", "135 MB"))
    writes, shown = 0, [st["message"]]
    for percent in range(43, 101):
        new = pulling(status.PullProgress(percent, f"{percent * 135 // 100} MB", "135 MB"), st)
        if new != st:
            writes, st = writes + 1, new
            shown.append(st["message"])
    assert shown == ["pulling model smollm2:135m: 42% (57/135 MB)", "pulling model smollm2:135m: 52% (70/135 MB)",
                     "pulling model smollm2:135m: 62% (83/135 MB)", "pulling model smollm2:135m: 72% (97/135 MB)",
                     "pulling model smollm2:135m: 82% (110/135 MB)", "pulling model smollm2:135m: 92% (124/135 MB)",
                     "pulling model smollm2:135m: 100% (135/135 MB)"]
    assert writes == 6


def test_an_unread_progress_keeps_what_is_shown_and_a_restarted_pull_shows_the_truth() -> None:
    st = pulling(status.PullProgress(42, "57 MB", "135 MB"))
    assert pulling(None, st) == st  # a log that could not be read this time: no write
    assert pulling(status.PullProgress(5, "6 MB", "135 MB"), st)["message"] == \
        "pulling model smollm2:135m: 5% (6/135 MB)"  # a new pod pulls from the start


def test_a_new_pod_pulling_beside_one_that_serves_shows_its_progress() -> None:
    # A scale-up from 1 to 2 (or a roll): one pod serves, the new one pulls the model for minutes.
    serving = {"metadata": {"name": "q"}, "status": {"initContainerStatuses": [
        {"name": "pull-model", "state": {"terminated": {"exitCode": 0}}}],
        "containerStatuses": [{"name": "model-api", "state": {"running": {}}, "ready": True}]}}
    built = desired.build(HOSTED, Settings())

    def scaled(progress: status.PullProgress | None, previous: dict[str, Any] | None = None) -> dict[str, Any]:
        observed = status.Observed(deployment(replicas=2, ready=1, updated=2), (serving, PULLING_POD),
                                   pulls={"p": progress} if progress is not None else {})
        return status.compute(HOSTED, built, observed, NOW, previous)

    assert status.pulling_pod(HOSTED, built, status.Observed(deployment(replicas=2, ready=1, updated=2),
                                                             (serving, PULLING_POD))) == "p"
    first = scaled(status.PullProgress(42, "57 MB", "135 MB"))
    assert (first["phase"], first["conditions"][0]["reason"]) == ("Ready", "PodsPartlyReady")
    assert first["message"] == "1 of 2 pods ready; pulling model smollm2:135m: 42% (57/135 MB)"
    assert scaled(status.PullProgress(45, "61 MB", "135 MB"), first) == first  # not every percent is a write
    later = scaled(status.PullProgress(62, "83 MB", "135 MB"), first)
    assert later["message"] == "1 of 2 pods ready; pulling model smollm2:135m: 62% (83/135 MB)"
    assert not status.ready_changed(first, later)
    assert scaled(None, later) == later  # a log unread this time keeps what is shown


def test_progress_alone_is_no_news_for_an_event() -> None:
    first = pulling(status.PullProgress(42, "57 MB", "135 MB"), {})
    later = pulling(status.PullProgress(62, "83 MB", "135 MB"), first)
    assert later["message"] != first["message"]
    assert not status.ready_changed(first, later)
    assert not status.ready_changed(pulling(None, {}), first)
    loading = compute(HOSTED, status.Observed(deployment(), (pod(
        init=[{"name": "pull-model", "state": {"terminated": {"exitCode": 0}}}],
        containers=[{"name": "model-api", "state": {"running": {}}, "ready": False}]),)))
    assert status.ready_changed(later, loading)


def at(ready: int, updated: int = 3, available: bool = True, replicas: int = 3,
       pods: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    return compute(MOCK, status.Observed(deployment(replicas=replicas, ready=ready, updated=updated,
                                                    available=available), pods))


def test_pods_counted_so_far_are_no_news_but_a_new_state_is() -> None:
    waiting, partly, more, one, three = (at(0, available=False, replicas=1), at(1, available=False),
                                         at(2, available=False), at(1), at(3))
    assert (waiting["message"], partly["message"]) == ("waiting for pods to become ready (0/1)", "1 of 3 pods ready")
    rolling, rolled_one = at(3, updated=0), at(3, updated=1)
    for before, after in ((waiting, at(0, available=False)), (partly, more), (one, three), (rolling, rolled_one)):
        assert not status.ready_changed(before, after)
        # Each is written, as the counters it goes with are: at most once a second (the controller's
        # MIRROR_INTERVAL).
        assert status.mirror_only(before, after)
    for before, after in ((waiting, partly), (more, three), (three, rolling), (rolled_one, three)):
        assert status.ready_changed(before, after)  # ready, all ready, rolling out, rolled out: a state each
        assert not status.mirror_only(before, after)
    noted = compute(MOCK, status.Observed(deployment(replicas=3, ready=1, available=True),
                                          (), warnings=("the cluster has no httproutes API",)))
    assert status.ready_changed(one, noted) and not status.mirror_only(one, noted)  # (a note is news)


def test_some_pods_ready_serve_the_endpoint_and_the_others_say_why_not() -> None:
    partly = at(1, available=False)  # a scale-up from 1 to 3: the Deployment is not Available until all are
    assert (partly["phase"], partly["ready"], partly["message"]) == ("Ready", True, "1 of 3 pods ready")
    assert partly["conditions"][0]["status"] == "True" and partly["conditions"][0]["reason"] == "PodsPartlyReady"
    unschedulable = pod()
    unschedulable["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                              "message": "0/1 nodes are available: 1 Insufficient cpu."}]
    stuck = at(1, available=False, pods=(unschedulable,))
    assert (stuck["phase"], stuck["message"]) == (
        "Ready", "1 of 3 pods ready; pod cannot be scheduled: 0/1 nodes are available: 1 Insufficient cpu.")
    assert status.ready_changed(partly, stuck)
    assert at(0, available=False, pods=(unschedulable,))["phase"] == "Pending"  # none serves: as before


def test_a_scale_is_not_a_roll_even_before_the_deployment_controller_counted_it() -> None:
    def seen(wanted: int, pods: int, updated: int) -> dict[str, Any]:
        d = deployment(replicas=pods, ready=pods, updated=updated, available=True)
        d["spec"]["replicas"] = wanted  # (the spec the operator applied; the status is the controller's last)
        return compute(MOCK, status.Observed(d))

    up, down, rolling = seen(3, 1, 1), seen(1, 3, 3), seen(1, 2, 1)
    assert (status.ready_of(up)["reason"], up["message"]) == ("Available", "1 of 3 pods ready")
    assert (status.ready_of(down)["reason"], down["message"]) == ("Available", "1 of 1 pods ready")
    assert (status.ready_of(rolling)["reason"], rolling["message"]) == (
        "RollingOut", "rolling out: 1 of 1 pods updated")


def test_a_roll_stuck_on_a_failing_new_pod_says_so_while_the_old_pods_serve() -> None:
    crashing = {"name": "model-api", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 3}}}
    serving_old = pod(containers=[{"name": "model-api", "ready": True, "state": {"running": {}}}])
    failing_new = pod(containers=[crashing])
    rolling = deployment(replicas=1, ready=1, updated=1, available=True)
    rolling["status"]["replicas"] = 2  # the old pod and the new one
    plain = compute(MOCK, status.Observed(rolling, (serving_old,)))
    stuck = compute(MOCK, status.Observed(rolling, (serving_old, failing_new)))
    assert (plain["phase"], plain["message"]) == ("Ready", "rolling out: 1 of 1 pods updated")
    assert (stuck["phase"], status.ready_of(stuck)["reason"]) == ("Ready", "RollingOut")
    assert stuck["message"].startswith("rolling out: 1 of 1 pods updated; container model-api is failing: "
                                       "CrashLoopBackOff (last exit code 3); see kubectl logs")
    assert status.ready_changed(plain, stuck)  # an Event says the roll is stuck, and why
