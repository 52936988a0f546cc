package main

// A stand-in for the scheduler and the kubelet, so that pods go through the same states as on
// a real node while the real ReplicaSet, Deployment, StatefulSet and Job controllers react to
// them. No container is run. It registers one Ready node, binds every pod of the default
// scheduler to it and walks each pod's status:
//
//	Pending (scheduled) -> init containers one by one: running -> terminated(0)
//	  -> containers running -> Ready    (phase Running)
//
// A test steers it through the env of a container in the pod spec (literal values only),
// which is the one channel that reaches the pod through a ModelAPI's podSpec override:
//
//	KAOS_FAKE_RUN_SECONDS=N    the container runs N seconds before it exits: an init container
//	                           then completes (holding the pod in Init for N s); a container
//	                           with KAOS_FAKE_EXIT_CODE exits after N s (default 0).
//	KAOS_FAKE_EXIT_CODE=N      the container exits with code N. Restarted as the pod's
//	                           restartPolicy says, with a short back-off (1 s doubling, at most
//	                           30 s): meanwhile it waits in CrashLoopBackOff with lastState
//	                           terminated and an increasing restartCount, and is not Ready.
//	                           With restartPolicy Never the pod ends Failed.
//	KAOS_FAKE_READY_SECONDS=N  a running container turns Ready N seconds after it started
//	                           (a slow readiness probe).
//
// Pods whose nodeSelector does not match the node, or that request a resource the node does
// not have (e.g. nvidia.com/gpu), stay Pending with PodScheduled=False/Unschedulable, as the
// scheduler would leave them. A pod being deleted is removed at once (grace period 0).
// With a real node (--real-node) the upstream kube-scheduler places pods instead, on either node.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"runtime"
	"strconv"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
)

const (
	envRunSeconds   = "KAOS_FAKE_RUN_SECONDS"
	envExitCode     = "KAOS_FAKE_EXIT_CODE"
	envReadySeconds = "KAOS_FAKE_READY_SECONDS"

	backoffBase = time.Second
	backoffMax  = 30 * time.Second
)

type fakeKubelet struct {
	cs     kubernetes.Interface
	node   *corev1.Node
	pods   corelisters.PodLister
	queue  workqueue.TypedRateLimitingInterface[string]
	nextIP atomic.Uint32
	bind   bool
}

// With bind false the real kube-scheduler places pods (there is a real node too): the fake kubelet
// then only runs the pods bound to its node.
func startFakeKubelet(ctx context.Context, cs kubernetes.Interface, nodeName, kubeVersion string, bind bool) error {
	k := &fakeKubelet{
		cs:    cs,
		bind:  bind,
		queue: workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]()),
	}
	if err := k.registerNode(ctx, nodeName, kubeVersion); err != nil {
		return fmt.Errorf("register node %s: %w", nodeName, err)
	}
	factory := informers.NewSharedInformerFactory(cs, 0)
	podInformer := factory.Core().V1().Pods()
	enqueue := func(obj any) {
		if key, err := cache.MetaNamespaceKeyFunc(obj); err == nil {
			k.queue.Add(key)
		}
	}
	if _, err := podInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, obj any) { enqueue(obj) },
	}); err != nil {
		return err
	}
	k.pods = podInformer.Lister()
	factory.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), podInformer.Informer().HasSynced) {
		return fmt.Errorf("pod informer did not sync")
	}
	go func() { <-ctx.Done(); k.queue.ShutDown() }()
	for range 4 {
		go wait.UntilWithContext(ctx, k.work, time.Second)
	}
	return nil
}

func (k *fakeKubelet) registerNode(ctx context.Context, name, kubeVersion string) error {
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:              resource.MustParse("64"),
		corev1.ResourceMemory:           resource.MustParse("256Gi"),
		corev1.ResourcePods:             resource.MustParse("1000"),
		corev1.ResourceEphemeralStorage: resource.MustParse("1Ti"),
	}
	now := metav1.Now()
	cond := func(t corev1.NodeConditionType, s corev1.ConditionStatus, reason string) corev1.NodeCondition {
		return corev1.NodeCondition{Type: t, Status: s, Reason: reason, LastHeartbeatTime: now, LastTransitionTime: now}
	}
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
			"kubernetes.io/hostname": name,
			"kubernetes.io/os":       "linux",
			"kubernetes.io/arch":     runtime.GOARCH,
			"kaos.tools/fake-node":   "true",
		}},
	}
	created, err := k.cs.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) { // a control plane restarted on its etcd data: the node is back
		created, err = k.cs.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	}
	if err != nil {
		return err
	}
	node = created
	node.Status = corev1.NodeStatus{
		Capacity:    capacity,
		Allocatable: capacity,
		Conditions: []corev1.NodeCondition{
			cond(corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory"),
			cond(corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure"),
			cond(corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID"),
			cond(corev1.NodeReady, corev1.ConditionTrue, "KubeletReady"),
		},
		Addresses: []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: "127.0.0.1"},
			{Type: corev1.NodeHostName, Address: name},
		},
		NodeInfo: corev1.NodeSystemInfo{
			KubeletVersion:          kubeVersion,
			OperatingSystem:         "linux",
			Architecture:            runtime.GOARCH,
			ContainerRuntimeVersion: "kaos-fake://1",
			OSImage:                 "kaos fake node",
		},
	}
	if node, err = k.cs.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{}); err != nil {
		return err
	}
	// The TaintNodesByCondition admission plugin gives a new node the not-ready taint; on a real
	// cluster the node lifecycle controller lifts it once the kubelet reports Ready.
	node.Spec.Taints = nil
	if node, err = k.cs.CoreV1().Nodes().Update(ctx, node, metav1.UpdateOptions{}); err != nil {
		return err
	}
	k.node = node
	return nil
}

func (k *fakeKubelet) work(ctx context.Context) {
	for {
		key, quit := k.queue.Get()
		if quit {
			return
		}
		after, err := k.sync(ctx, key)
		switch {
		case err != nil:
			logf("fake kubelet: %s: %v", key, err)
			k.queue.AddRateLimited(key)
		case after > 0:
			k.queue.Forget(key)
			k.queue.AddAfter(key, after)
		default:
			k.queue.Forget(key)
		}
		k.queue.Done(key)
	}
}

// sync moves one pod forward; it returns when to look at the pod again (0: on its next change).
func (k *fakeKubelet) sync(ctx context.Context, key string) (time.Duration, error) {
	ns, name, _ := cache.SplitMetaNamespaceKey(key)
	pod, err := k.pods.Pods(ns).Get(name)
	if apierrors.IsNotFound(err) {
		return 0, nil
	} else if err != nil {
		return 0, err
	}
	pods := k.cs.CoreV1().Pods(ns)
	switch {
	case pod.DeletionTimestamp != nil:
		if pod.Spec.NodeName != k.node.Name {
			return 0, nil
		}
		// The kubelet's part of a graceful deletion: the containers are gone, remove the pod.
		err := pods.Delete(ctx, name, metav1.DeleteOptions{
			GracePeriodSeconds: new(int64),
			Preconditions:      &metav1.Preconditions{UID: &pod.UID},
		})
		if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
			return 0, nil
		}
		return 0, err
	case pod.Spec.NodeName == "":
		if !k.bind {
			return 0, nil // the scheduler's
		}
		if pod.Spec.SchedulerName != "" && pod.Spec.SchedulerName != corev1.DefaultSchedulerName {
			return 0, nil // some other scheduler's pod
		}
		if reason := k.unschedulable(pod); reason != "" {
			return 0, k.markUnschedulable(ctx, pod, reason)
		}
		err := pods.Bind(ctx, &corev1.Binding{
			ObjectMeta: metav1.ObjectMeta{Name: name, UID: pod.UID},
			Target:     corev1.ObjectReference{Kind: "Node", Name: k.node.Name},
		}, metav1.CreateOptions{})
		if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
			return 0, nil
		}
		return 0, err // the binding's update event brings the pod back
	case pod.Spec.NodeName != k.node.Name,
		pod.Status.Phase == corev1.PodSucceeded, pod.Status.Phase == corev1.PodFailed:
		return 0, nil
	}
	status, after := k.nextStatus(pod, time.Now())
	if equality.Semantic.DeepEqual(status, &pod.Status) {
		return after, nil
	}
	updated := pod.DeepCopy()
	updated.Status = *status
	if _, err := pods.UpdateStatus(ctx, updated, metav1.UpdateOptions{}); err != nil {
		if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
			return 0, nil // deleted or changed meanwhile: its event requeues it
		}
		return 0, err
	}
	return after, nil
}

// unschedulable says why the scheduler would not place pod on the node ("" if it would).
func (k *fakeKubelet) unschedulable(pod *corev1.Pod) string {
	if !labels.SelectorFromSet(pod.Spec.NodeSelector).Matches(labels.Set(k.node.Labels)) {
		return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
	}
	for _, c := range append(append([]corev1.Container{}, pod.Spec.InitContainers...), pod.Spec.Containers...) {
		for res, qty := range c.Resources.Requests {
			if avail, ok := k.node.Status.Allocatable[res]; !ok || qty.Cmp(avail) > 0 {
				return fmt.Sprintf("0/1 nodes are available: 1 Insufficient %s.", res)
			}
		}
	}
	return ""
}

func (k *fakeKubelet) markUnschedulable(ctx context.Context, pod *corev1.Pod, message string) error {
	updated := pod.DeepCopy()
	setCondition(&updated.Status, corev1.PodScheduled, corev1.ConditionFalse,
		corev1.PodReasonUnschedulable, message, metav1.Now())
	if equality.Semantic.DeepEqual(updated.Status, pod.Status) {
		return nil
	}
	_, err := k.cs.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, updated, metav1.UpdateOptions{})
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		return nil
	}
	return err
}

// control is what the KAOS_FAKE_* env of one container asks for.
type control struct {
	run, ready time.Duration
	exitCode   *int32
}

func controlOf(c *corev1.Container) control {
	var ctl control
	for _, e := range c.Env {
		n, err := strconv.Atoi(e.Value)
		if err != nil {
			continue
		}
		switch e.Name {
		case envRunSeconds:
			ctl.run = time.Duration(n) * time.Second
		case envReadySeconds:
			ctl.ready = time.Duration(n) * time.Second
		case envExitCode:
			code := int32(n)
			ctl.exitCode = &code
		}
	}
	return ctl
}

// nextStatus computes the pod's status at now from its current status, and when it changes next.
func (k *fakeKubelet) nextStatus(pod *corev1.Pod, t time.Time) (*corev1.PodStatus, time.Duration) {
	t = t.Truncate(time.Second) // the API keeps seconds: compute with what it will store
	now := metav1.NewTime(t)
	st := pod.Status.DeepCopy()
	var next time.Duration
	wake := func(d time.Duration) {
		if d > 0 && (next == 0 || d < next) {
			next = d
		}
	}
	if st.StartTime == nil {
		n := k.nextIP.Add(1)
		ip := fmt.Sprintf("127.244.%d.%d", (n/250)%256, n%250+2)
		// Loopback pod IPs: nothing is listening there, and a client that tries anyway stays
		// on this machine.
		st.StartTime = &now
		st.HostIP, st.HostIPs = "127.0.0.1", []corev1.HostIP{{IP: "127.0.0.1"}}
		st.PodIP, st.PodIPs = ip, []corev1.PodIP{{IP: ip}}
		st.Phase = corev1.PodPending
	}
	setCondition(st, corev1.PodScheduled, corev1.ConditionTrue, "", "", now)
	setCondition(st, corev1.PodReadyToStartContainers, corev1.ConditionTrue, "", "", now)

	initStatus := statusMap(st.InitContainerStatuses)
	st.InitContainerStatuses = nil
	initDone, initFailed, sidecarsReady := true, false, true
	for i := range pod.Spec.InitContainers {
		c := &pod.Spec.InitContainers[i]
		cs := initStatus[c.Name]
		if cs == nil {
			cs = newContainerStatus(c, "PodInitializing")
		}
		if initDone { // init containers start one after the other
			if isSidecar(c) { // started in its turn, then runs beside the containers
				wake(advance(pod, c, cs, false, true, t))
				sidecarsReady = sidecarsReady && cs.Ready
			} else {
				wake(advance(pod, c, cs, true, pod.Spec.RestartPolicy != corev1.RestartPolicyNever, t))
				if term := cs.State.Terminated; term == nil || term.ExitCode != 0 {
					initDone = false
					initFailed = term != nil // failed for good (restartPolicy Never)
				}
			}
		}
		st.InitContainerStatuses = append(st.InitContainerStatuses, *cs)
	}

	mainStatus := statusMap(st.ContainerStatuses)
	st.ContainerStatuses = nil
	allReady, running, allDone, anyFailed := initDone && sidecarsReady, false, initDone, initFailed
	for i := range pod.Spec.Containers {
		c := &pod.Spec.Containers[i]
		cs := mainStatus[c.Name]
		if cs == nil {
			cs = newContainerStatus(c, map[bool]string{true: "ContainerCreating", false: "PodInitializing"}[initDone])
		}
		if initDone {
			code := controlOf(c).exitCode
			restart := pod.Spec.RestartPolicy == corev1.RestartPolicyAlways ||
				pod.Spec.RestartPolicy == corev1.RestartPolicyOnFailure && code != nil && *code != 0
			wake(advance(pod, c, cs, false, restart, t))
		}
		allReady = allReady && cs.Ready
		running = running || cs.State.Running != nil || cs.RestartCount > 0
		allDone = allDone && cs.State.Terminated != nil
		anyFailed = anyFailed || cs.State.Terminated != nil && cs.State.Terminated.ExitCode != 0
		st.ContainerStatuses = append(st.ContainerStatuses, *cs)
	}

	switch {
	case initFailed || allDone && anyFailed:
		st.Phase = corev1.PodFailed
	case allDone:
		st.Phase = corev1.PodSucceeded
	case initDone && running:
		st.Phase = corev1.PodRunning
	default:
		st.Phase = corev1.PodPending
	}
	boolStatus := map[bool]corev1.ConditionStatus{true: corev1.ConditionTrue, false: corev1.ConditionFalse}
	notReadyReason := map[bool]string{true: "", false: "ContainersNotReady"}[allReady]
	if allDone {
		notReadyReason = "PodCompleted"
	}
	initReason := map[bool]string{true: "", false: "ContainersNotInitialized"}[initDone]
	setCondition(st, corev1.PodInitialized, boolStatus[initDone], initReason, "", now)
	setCondition(st, corev1.ContainersReady, boolStatus[allReady && !allDone], notReadyReason, "", now)
	setCondition(st, corev1.PodReady, boolStatus[allReady && !allDone], notReadyReason, "", now)
	return st, next
}

// advance walks one container's status forward to t: waiting -> running -> (exit ->
// CrashLoopBackOff -> running ...). It returns when the container's state changes next.
// An init container (not a sidecar) always exits, by default with 0 at once.
func advance(pod *corev1.Pod, c *corev1.Container, cs *corev1.ContainerStatus, isInit, restart bool, t time.Time) time.Duration {
	ctl := controlOf(c)
	exits := isInit || ctl.exitCode != nil
	code := int32(0)
	if ctl.exitCode != nil {
		code = *ctl.exitCode
	}
	for range 100 { // a few transitions at most; bounded in case of a bug
		switch {
		case cs.State.Running != nil:
			started := cs.State.Running.StartedAt.Time
			if exits {
				end := started.Add(ctl.run)
				if t.Before(end) {
					return end.Sub(t) + time.Second
				}
				reason := map[bool]string{true: "Completed", false: "Error"}[code == 0]
				cs.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
					ExitCode: code, Reason: reason, ContainerID: cs.ContainerID,
					StartedAt: metav1.NewTime(started), FinishedAt: metav1.NewTime(end),
				}}
				cs.Ready, cs.Started = false, ptr(false)
				continue
			}
			ready := started.Add(ctl.ready)
			cs.Started = ptr(true)
			cs.Ready = !t.Before(ready)
			if !cs.Ready {
				return ready.Sub(t) + time.Second
			}
			return 0
		case cs.State.Terminated != nil:
			term := cs.State.Terminated
			if !restart || isInit && term.ExitCode == 0 {
				return 0 // done for good
			}
			cs.LastTerminationState = corev1.ContainerState{Terminated: term}
			cs.RestartCount++
			delay := min(backoffBase<<min(cs.RestartCount-1, 10), backoffMax)
			cs.State = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{
				Reason: "CrashLoopBackOff",
				Message: fmt.Sprintf("back-off %s restarting failed container=%s pod=%s_%s(%s)",
					delay, c.Name, pod.Name, pod.Namespace, pod.UID),
			}}
		case cs.State.Waiting != nil && cs.State.Waiting.Reason == "CrashLoopBackOff":
			last := cs.LastTerminationState.Terminated.FinishedAt.Time
			until := last.Add(min(backoffBase<<min(cs.RestartCount-1, 10), backoffMax))
			if t.Before(until) {
				return until.Sub(t) + time.Second/2
			}
			cs.State = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(until)}}
			cs.ContainerID = containerID(pod.UID, c.Name, cs.RestartCount)
		default: // waiting to start
			cs.State = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(t)}}
			cs.ContainerID = containerID(pod.UID, c.Name, cs.RestartCount)
		}
	}
	return 0
}

func isSidecar(c *corev1.Container) bool {
	return c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways
}

func newContainerStatus(c *corev1.Container, waitReason string) *corev1.ContainerStatus {
	return &corev1.ContainerStatus{
		Name:    c.Name,
		Image:   c.Image,
		ImageID: "kaos-fake://" + c.Image,
		Started: ptr(false),
		State:   corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: waitReason}},
	}
}

func containerID(uid types.UID, name string, restarts int32) string {
	sum := sha256.Sum256(fmt.Appendf(nil, "%s/%s/%d", uid, name, restarts))
	return "kaos-fake://" + hex.EncodeToString(sum[:])
}

func statusMap(list []corev1.ContainerStatus) map[string]*corev1.ContainerStatus {
	m := make(map[string]*corev1.ContainerStatus, len(list))
	for i := range list {
		m[list[i].Name] = &list[i]
	}
	return m
}

// setCondition sets a pod condition, keeping its transition time unless its status changes.
func setCondition(st *corev1.PodStatus, t corev1.PodConditionType, s corev1.ConditionStatus, reason, msg string, now metav1.Time) {
	for i := range st.Conditions {
		c := &st.Conditions[i]
		if c.Type == t {
			if c.Status != s {
				c.LastTransitionTime = now
			}
			c.Status, c.Reason, c.Message = s, reason, msg
			return
		}
	}
	st.Conditions = append(st.Conditions, corev1.PodCondition{Type: t, Status: s, Reason: reason, Message: msg, LastTransitionTime: now})
}

func ptr[T any](v T) *T { return &v }
