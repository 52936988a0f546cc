// Command kaos-controlplane runs a real Kubernetes control plane on loopback, without
// containers, for the tests, benchmarks and `make dev` of kaos-modelapi: embedded etcd, the
// upstream kube-apiserver and kube-controller-manager (built from k8s.io/kubernetes, so their
// semantics are Kubernetes' own), the Gateway API CRDs, and a stand-in kubelet (kubelet.go).
//
// One binary, several processes: `kaos-controlplane [flags]` is the supervisor; it runs etcd
// and the fake kubelet itself and starts `kaos-controlplane kube-apiserver ...` and
// `kaos-controlplane kube-controller-manager ...` as child processes (as hyperkube did), because
// both components keep process-global state (flags, feature gates, metrics registries,
// signal handlers) that cannot be shared safely. The children die with the supervisor
// (Pdeathsig), so stopping the supervisor stops everything.
//
// Start protocol, for e2e/cluster.py: everything is logged to files under <state-dir>/logs;
// stderr carries exactly one line, "ready: <kubeconfig>" or "error: <what to do>", and is then
// closed. On a failed start nothing is left running and only the logs remain.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/embed"
	"golang.org/x/sys/unix"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // as in cmd/kube-apiserver
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics in /metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // kubernetes_build_info
	"k8s.io/component-base/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	kcm "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	kubeproxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

const (
	serviceCIDR      = "10.96.0.0/16"
	serviceClusterIP = "10.96.0.1" // the `kubernetes` Service: first address of serviceCIDR
	startTimeout     = 3 * time.Minute
)

// controllers run by kube-controller-manager: the workload controllers, garbage collection,
// namespace deletion and what a namespace needs before pods can be created in it (the default
// ServiceAccount, kube-root-ca.crt), and the volume controllers a PersistentVolumeClaim needs: the
// binder (a claim binds to a matching PersistentVolume; a pod mounts only a Bound claim) and the two
// protection controllers (admission puts their finalizers on every claim and volume; without them a
// claim, and its namespace, would never finish deleting). Node and cloud controllers have nothing to
// act on.
var controllers = []string{
	"deployment-controller", "replicaset-controller", "statefulset-controller", "daemonset-controller",
	"job-controller", "cronjob-controller", "ttl-after-finished-controller", "disruption-controller",
	"garbage-collector-controller", "namespace-controller", "serviceaccount-controller",
	"root-ca-certificate-publisher-controller", "persistentvolume-binder-controller",
	"persistentvolumeclaim-protection-controller", "persistentvolume-protection-controller",
}

type options struct {
	stateDir       string
	apiserverPort  int
	etcdPort       int
	etcdPeerPort   int
	nodeName       string
	exitWithParent bool
	realNode       bool
	restart        bool
}

func main() {
	if len(os.Args) > 1 {
		var cmd *cobra.Command
		switch os.Args[1] {
		case "kube-apiserver":
			cmd = apiserver.NewAPIServerCommand()
		case "kube-controller-manager":
			cmd = kcm.NewControllerManagerCommand()
		case "kube-scheduler":
			cmd = scheduler.NewSchedulerCommand()
		case "kubelet":
			// A nil context panics: the kubelet derives its run context from this one.
			cmd = kubelet.NewKubeletCommand(context.Background())
		case "kube-proxy":
			cmd = kubeproxy.NewProxyCommand()
		}
		if cmd != nil {
			cmd.SetArgs(os.Args[2:])
			os.Exit(cli.Run(cmd))
		}
	}
	var o options
	flag.StringVar(&o.stateDir, "state-dir", ".cluster", "folder for certificates, etcd data, kubeconfig and logs")
	flag.IntVar(&o.apiserverPort, "apiserver-port", 26443, "kube-apiserver HTTPS port on 127.0.0.1")
	flag.IntVar(&o.etcdPort, "etcd-port", 26379, "etcd client port on 127.0.0.1")
	flag.IntVar(&o.etcdPeerPort, "etcd-peer-port", 26380, "etcd peer port on 127.0.0.1")
	flag.StringVar(&o.nodeName, "node-name", "kaos-node", "name of the fake node")
	flag.BoolVar(&o.exitWithParent, "exit-with-parent", false, "shut down when the parent process exits")
	flag.BoolVar(&o.realNode, "real-node", false, "a real kubelet will join (e2e/node.py): run kube-scheduler and the "+
		"EndpointSlice controller, and let the scheduler place pods on the fake node instead of binding them itself")
	flag.BoolVar(&o.restart, "restart", false, "start again on the etcd data and certificates that a stopped or killed "+
		"control plane left in the state folder (a control plane restart, as after a crash)")
	flag.Parse()
	os.Exit(run(o))
}

// status is where the one-line outcome of the start goes (the original stderr).
var status = os.Stderr

func fail(err error) int {
	fmt.Fprintln(status, "error: "+strings.Join(strings.Fields(err.Error()), " "))
	return 1
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s kaos-controlplane: %s\n", time.Now().Format(time.RFC3339Nano), fmt.Sprintf(format, args...))
}

func run(o options) int {
	dir, err := filepath.Abs(o.stateDir)
	if err != nil {
		return fail(err)
	}
	if err := checkState(dir, o.restart); err != nil {
		return fail(err)
	}
	for _, p := range []struct {
		port      int
		what, env string
	}{
		{o.apiserverPort, "kube-apiserver", "KAOS_APISERVER_PORT"},
		{o.etcdPort, "etcd", "KAOS_ETCD_PORT"},
		{o.etcdPeerPort, "etcd peers", "KAOS_ETCD_PEER_PORT"},
	} {
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p.port))
		if err != nil {
			return fail(fmt.Errorf("port 127.0.0.1:%d, wanted for %s, is in use: stop what listens there "+
				"(`ss -ltnp 'sport = :%d'`) or choose another port with %s=<port>", p.port, p.what, p.port, p.env))
		}
		l.Close()
	}
	cp := &controlPlane{o: o, dir: dir, logs: filepath.Join(dir, "logs")}
	if err := os.MkdirAll(cp.logs, 0o755); err != nil {
		return fail(err)
	}
	logFile, err := os.Create(filepath.Join(cp.logs, "controlplane.log"))
	if err != nil {
		return fail(err)
	}
	// From here on, whatever this process writes (its log, client-go's, a panic) goes to the
	// log file; the original stderr is kept for the one-line outcome.
	// close-on-exec, so that the children do not hold it open: its reader waits for EOF.
	if fd, err := unix.FcntlInt(2, unix.F_DUPFD_CLOEXEC, 3); err == nil {
		status = os.NewFile(uintptr(fd), "status")
		_ = unix.Dup3(int(logFile.Fd()), 1, 0)
		_ = unix.Dup3(int(logFile.Fd()), 2, 0)
	}
	if err := os.WriteFile(filepath.Join(dir, "pid"), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		return fail(err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if o.exitWithParent {
		go exitWithParent(ctx, stop)
	}
	began := time.Now()
	startCtx, cancelStart := context.WithTimeout(ctx, startTimeout)
	err = cp.start(startCtx)
	cancelStart()
	if err != nil {
		logf("start failed: %v", err)
		cp.shutdown()
		// Leave only the logs, so the folder does not look like a stopped cluster's state.
		for _, name := range []string{"pid", "kubeconfig", "pki", "etcd"} {
			os.RemoveAll(filepath.Join(dir, name))
		}
		if strings.Contains(err.Error(), "address already in use") {
			err = fmt.Errorf("%w: another process took the port during the start; try again, or choose "+
				"free ports with KAOS_APISERVER_PORT, KAOS_ETCD_PORT and KAOS_ETCD_PEER_PORT", err)
		}
		return fail(fmt.Errorf("%w (logs: %s)", err, cp.logs))
	}
	logf("ready after %s", time.Since(began).Round(time.Millisecond))
	fmt.Fprintf(status, "ready: %s\n", cp.kubeconfig())
	status.Close()

	code := 0
	select {
	case <-ctx.Done():
		logf("stopping")
	case <-cp.apiserver.done:
		logf("kube-apiserver exited: %v; stopping", cp.apiserver.err)
		code = 1
	case <-cp.kcm.done:
		logf("kube-controller-manager exited: %v; stopping", cp.kcm.err)
		code = 1
	case <-cp.schedulerDone():
		logf("kube-scheduler exited: %v; stopping", cp.scheduler.err)
		code = 1
	case err := <-cp.etcd.Err():
		logf("etcd failed: %v; stopping", err)
		code = 1
	}
	cp.shutdown()
	logf("stopped")
	if parentGone.Load() {
		// Nobody is left to remove the (private) state folder of an abandoned session.
		os.RemoveAll(dir)
	}
	return code
}

// checkState refuses a state folder that belongs to a running or a dead control plane: the
// first is in use, the second holds certificates and etcd data that no longer match anything
// (unless restarting on them is what was asked for).
func checkState(dir string, restart bool) error {
	if data, err := os.ReadFile(filepath.Join(dir, "pid")); err == nil {
		pid, _ := strconv.Atoi(strings.TrimSpace(string(data)))
		if processAlive(pid) {
			return fmt.Errorf("a control plane is already running from %s (pid %d): use %s, or stop it with `make cluster-down`",
				dir, pid, filepath.Join(dir, "kubeconfig"))
		}
		if restart {
			return nil
		}
		return fmt.Errorf("%s holds the state of a control plane that is no longer running (pid %d): "+
			"run `make cluster-down` to remove it, then start again", dir, pid)
	}
	if restart {
		return fmt.Errorf("%s holds no stopped control plane to restart: start one without --restart", dir)
	}
	if _, err := os.Stat(filepath.Join(dir, "etcd")); err == nil {
		return fmt.Errorf("%s holds the etcd data of an earlier control plane: "+
			"run `make cluster-down` to remove it, then start again", dir)
	}
	return nil
}

func processAlive(pid int) bool {
	if pid <= 0 || syscall.Kill(pid, 0) != nil {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(cmdline), "kaos-controlplane")
}

var parentGone atomic.Bool

// exitWithParent stops the control plane when the process that started it goes away, so a
// test run that is killed does not leave a cluster behind.
func exitWithParent(ctx context.Context, stop func()) {
	parent := os.Getppid()
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if os.Getppid() != parent {
				logf("parent process %d exited", parent)
				parentGone.Store(true)
				stop()
				return
			}
		}
	}
}

type controlPlane struct {
	o             options
	dir, logs     string
	pki           *pki
	etcd          *embed.Etcd
	apiserver     *child
	kcm           *child
	scheduler     *child // only with a real node
	stopKubelet   context.CancelFunc
	clientset     kubernetes.Interface
	dynamicClient dynamic.Interface
}

func (cp *controlPlane) kubeconfig() string { return filepath.Join(cp.dir, "kubeconfig") }
func (cp *controlPlane) server() string {
	return fmt.Sprintf("https://127.0.0.1:%d", cp.o.apiserverPort)
}

func (cp *controlPlane) start(ctx context.Context) error {
	var err error
	newOrLoad := newPKI
	if cp.o.restart {
		newOrLoad = loadPKI
	}
	if cp.pki, err = newOrLoad(filepath.Join(cp.dir, "pki")); err != nil {
		return fmt.Errorf("certificates: %w", err)
	}
	if err := cp.startEtcd(ctx); err != nil {
		return err
	}

	pkiPath := cp.pki.path
	cp.apiserver, err = startChild("kube-apiserver", filepath.Join(cp.logs, "kube-apiserver.log"),
		"--etcd-servers="+fmt.Sprintf("http://127.0.0.1:%d", cp.o.etcdPort),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", cp.o.apiserverPort),
		"--tls-cert-file="+pkiPath("apiserver.crt"),
		"--tls-private-key-file="+pkiPath("apiserver.key"),
		"--client-ca-file="+pkiPath("ca.crt"),
		"--cert-dir="+pkiPath(""),
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file="+pkiPath("sa.pub"),
		"--service-account-signing-key-file="+pkiPath("sa.key"),
		"--service-cluster-ip-range="+serviceCIDR,
		"--authorization-mode=RBAC",
		// As OpenShift and hardened clusters do: setting blockOwnerDeletion on a child needs `update` on the
		// owner's finalizers, so tests running the operator with the chart's RBAC prove it has that.
		"--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
		"--allow-privileged=true",
		// No kubelets: nothing for the `kubernetes` Service's endpoints to point at but this
		// loopback address, which Endpoints do not accept.
		"--endpoint-reconciler-type=none",
		// Compact often (default 5m, so the first compaction lands ~10m in), so that a read at an old
		// resourceVersion that the watch cache cannot serve (an exact list, a continue token) gets 410
		// Gone from etcd within a minute of the start, as on any long-lived cluster, not old data.
		"--etcd-compaction-interval=20s",
		"--profiling=false",
		// kubectl logs/exec/port-forward to a real node's kubelet (e2e/node.py): its serving certificate is
		// signed by the cluster CA, and it authenticates the apiserver by this client certificate.
		"--kubelet-certificate-authority="+pkiPath("ca.crt"),
		"--kubelet-client-certificate="+pkiPath("admin.crt"),
		"--kubelet-client-key="+pkiPath("admin.key"),
		// The node's name is no DNS name here: reach the kubelet by its address.
		"--kubelet-preferred-address-types=InternalIP",
	)
	if err != nil {
		return err
	}
	cfg := &rest.Config{
		Host:            cp.server(),
		TLSClientConfig: rest.TLSClientConfig{CAData: cp.pki.ca.certPEM, CertData: cp.pki.admin.certPEM, KeyData: cp.pki.admin.keyPEM},
		QPS:             200,
		Burst:           400,
		UserAgent:       "kaos-controlplane",
	}
	if cp.clientset, err = kubernetes.NewForConfig(cfg); err != nil {
		return err
	}
	if cp.dynamicClient, err = dynamic.NewForConfig(cfg); err != nil {
		return err
	}
	if err := cp.waitFor(ctx, "kube-apiserver to be ready", cp.apiserver, func(ctx context.Context) (bool, error) {
		body, err := cp.clientset.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err == nil && string(body) == "ok", nil
	}); err != nil {
		return err
	}
	logf("kube-apiserver %s ready on %s", version.Get().GitVersion, cp.server())

	kcmKubeconfig := pkiPath("kube-controller-manager.kubeconfig")
	if err := writeKubeconfig(kcmKubeconfig, cp.server(), cp.pki.ca.certPEM, cp.pki.kcm); err != nil {
		return err
	}
	cp.kcm, err = startChild("kube-controller-manager", filepath.Join(cp.logs, "kube-controller-manager.log"),
		"--kubeconfig="+kcmKubeconfig,
		"--controllers="+strings.Join(cp.controllers(), ","),
		"--leader-elect=false",
		"--secure-port=0", // nothing scrapes it; one port less to collide
		"--use-service-account-credentials=false",
		"--root-ca-file="+pkiPath("ca.crt"),
		"--kube-api-qps=200",
		"--kube-api-burst=400",
	)
	if err != nil {
		return err
	}
	if err := installGatewayAPI(ctx, cp.clientset, cp.dynamicClient); err != nil {
		return fmt.Errorf("Gateway API CRDs: %w", err)
	}
	if cp.o.realNode {
		if err := cp.startScheduler(); err != nil {
			return err
		}
	}
	kubeletCtx, stopKubelet := context.WithCancel(context.Background())
	cp.stopKubelet = stopKubelet
	if err := startFakeKubelet(kubeletCtx, cp.clientset, cp.o.nodeName, version.Get().GitVersion, !cp.o.realNode); err != nil {
		return fmt.Errorf("fake kubelet: %w", err)
	}
	// Pods can only be created in a namespace once its default ServiceAccount exists: wait for
	// the controller manager to have made the one of `default`.
	if err := cp.waitFor(ctx, "kube-controller-manager to create default/default ServiceAccount", cp.kcm,
		func(ctx context.Context) (bool, error) {
			_, err := cp.clientset.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
			return err == nil, nil
		}); err != nil {
		return err
	}
	return writeKubeconfig(cp.kubeconfig(), cp.server(), cp.pki.ca.certPEM, cp.pki.admin)
}

func (cp *controlPlane) startEtcd(ctx context.Context) error {
	cfg := embed.NewConfig()
	cfg.Name = "kaos"
	cfg.Dir = filepath.Join(cp.dir, "etcd")
	client := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", cp.o.etcdPort)}
	peer := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", cp.o.etcdPeerPort)}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{client}, []url.URL{client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peer}, []url.URL{peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogOutputs = []string{filepath.Join(cp.logs, "etcd.log")}
	cfg.LogLevel = "warn"
	// A throw-away cluster: losing data on a machine crash is fine, waiting for fsync is not.
	cfg.UnsafeNoFsync = true
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	cp.etcd = e
	select {
	case <-e.Server.ReadyNotify():
		return nil
	case err := <-e.Err():
		return fmt.Errorf("etcd: %w", err)
	case <-ctx.Done():
		return fmt.Errorf("etcd did not become ready: %w", ctx.Err())
	}
}

// waitFor polls cond until it holds, the component c exits, or ctx ends.
func (cp *controlPlane) waitFor(ctx context.Context, what string, c *child, cond wait.ConditionWithContextFunc) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-c.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	err := wait.PollUntilContextCancel(ctx, 100*time.Millisecond, true, cond)
	select {
	case <-c.done:
		return fmt.Errorf("%s exited while waiting for %s (%v): %s", c.name, what, c.err, lastLine(c.log))
	default:
	}
	if err != nil {
		return fmt.Errorf("timed out waiting for %s", what)
	}
	return nil
}

func (cp *controlPlane) shutdown() {
	if cp.stopKubelet != nil {
		cp.stopKubelet()
	}
	for _, c := range []*child{cp.scheduler, cp.kcm, cp.apiserver} {
		if c != nil {
			c.stop(20 * time.Second)
		}
	}
	if cp.etcd != nil {
		cp.etcd.Close()
	}
}

// child is a component running as a child process of this binary.
type child struct {
	name, log string
	cmd       *exec.Cmd
	done      chan struct{} // closed when the process has exited; err is then set
	err       error
}

func startChild(name, logPath string, args ...string) (*child, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	c := &child{name: name, log: logPath, done: make(chan struct{})}
	c.cmd = exec.Command(self, append([]string{name}, args...)...)
	c.cmd.Stdout, c.cmd.Stderr = logFile, logFile
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	started := make(chan error)
	go func() {
		// Pdeathsig fires when the thread that started the child exits, not the process:
		// keep this goroutine on its thread for as long as the child lives.
		runtime.LockOSThread()
		defer logFile.Close()
		if err := c.cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		c.err = c.cmd.Wait()
		close(c.done)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return c, nil
}

func (c *child) stop(grace time.Duration) {
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(grace):
		logf("%s did not stop within %s; killing it", c.name, grace)
		_ = c.cmd.Process.Kill()
		<-c.done
	}
}

// lastLine returns the last non-empty line of a log file, which for a component that failed to
// start is usually its reason.
func lastLine(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	return lines[len(lines)-1]
}

// controllers run by kube-controller-manager; with a real node also the EndpointSlice controller, so
// that kube-proxy routes Services to its pods (the fake node's loopback pod IPs are refused by
// EndpointSlice validation, hence not without one).
func (cp *controlPlane) controllers() []string {
	if cp.o.realNode {
		return append(append([]string{}, controllers...), "endpointslice-controller")
	}
	return controllers
}

// startScheduler runs the upstream kube-scheduler: with two nodes, placement is the scheduler's
// (taints, tolerations, node selectors, resources), not the fake kubelet's trivial binding.
func (cp *controlPlane) startScheduler() error {
	pkiPath := cp.pki.path
	kubeconfig := pkiPath("kube-scheduler.kubeconfig")
	if err := writeKubeconfig(kubeconfig, cp.server(), cp.pki.ca.certPEM, cp.pki.admin); err != nil {
		return err
	}
	config := pkiPath("kube-scheduler.yaml")
	// QPS as the controller manager's: hundreds of pods are bound within seconds in the benchmarks.
	if err := os.WriteFile(config, []byte(`apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  kubeconfig: `+kubeconfig+`
  qps: 200
  burst: 400
leaderElection:
  leaderElect: false
`), 0o600); err != nil {
		return err
	}
	var err error
	cp.scheduler, err = startChild("kube-scheduler", filepath.Join(cp.logs, "kube-scheduler.log"),
		"--config="+config, "--secure-port=0")
	return err
}

// schedulerDone is closed when the scheduler exits; never, when there is none.
func (cp *controlPlane) schedulerDone() <-chan struct{} {
	if cp.scheduler == nil {
		return nil
	}
	return cp.scheduler.done
}
