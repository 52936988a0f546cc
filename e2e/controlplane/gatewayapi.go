package main

// The Gateway API standard channel (HTTPRoute with rules[].timeouts, among others), installed
// at start so the operator can create HTTPRoutes as on a cluster that has Gateway API.
//
// The manifests are not written by hand: `go generate` copies them, verbatim, from the
// sigs.k8s.io/gateway-api module pinned in go.mod (checked against go.sum by the go command)
// into crds/, which is not committed; e2e/cluster.py runs it before every build.

//go:generate sh -c "go mod download sigs.k8s.io/gateway-api && rm -rf crds && mkdir crds && install -m 0644 \"$(go list -m -f '{{.Dir}}' sigs.k8s.io/gateway-api)\"/config/crd/standard/*.yaml crds/"

import (
	"bytes"
	"context"
	"embed"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/wait"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/gateway-api/pkg/consts"
)

//go:embed crds/*.yaml
var gatewayAPIManifests embed.FS

var crdResource = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// installGatewayAPI server-side applies every object of the standard channel (the CRDs and the
// ValidatingAdmissionPolicy that guards them) and waits until the CRDs are Established.
func installGatewayAPI(ctx context.Context, cs kubernetes.Interface, dyn dynamic.Interface) error {
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(cs.Discovery()))
	files, err := fs.Glob(gatewayAPIManifests, "crds/*.yaml")
	if err != nil || len(files) == 0 {
		return fmt.Errorf("no Gateway API manifests embedded (run `go generate` before `go build`)")
	}
	var crds []string
	for _, file := range files {
		data, _ := gatewayAPIManifests.ReadFile(file)
		dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
		for {
			var obj unstructured.Unstructured
			if err := dec.Decode(&obj.Object); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				return fmt.Errorf("%s: %w", file, err)
			}
			if obj.GetKind() == "" {
				continue // an empty document
			}
			gvk := obj.GroupVersionKind()
			mapping, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
			if err != nil {
				return fmt.Errorf("%s: %s: %w", file, gvk, err)
			}
			if _, err := dyn.Resource(mapping.Resource).Apply(ctx, obj.GetName(), &obj,
				metav1.ApplyOptions{FieldManager: "kaos-controlplane", Force: true}); err != nil {
				return fmt.Errorf("apply %s %s: %w", gvk.Kind, obj.GetName(), err)
			}
			if mapping.Resource == crdResource {
				crds = append(crds, obj.GetName())
			}
		}
	}
	for _, name := range crds {
		err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 60*time.Second, true,
			func(ctx context.Context) (bool, error) {
				crd, err := dyn.Resource(crdResource).Get(ctx, name, metav1.GetOptions{})
				if apierrors.IsNotFound(err) {
					return false, nil
				} else if err != nil {
					return false, err
				}
				conds, _, _ := unstructured.NestedSlice(crd.Object, "status", "conditions")
				for _, c := range conds {
					m, _ := c.(map[string]any)
					if m["type"] == "Established" && m["status"] == "True" {
						return true, nil
					}
				}
				return false, nil
			})
		if err != nil {
			return fmt.Errorf("CRD %s not established: %w", name, err)
		}
	}
	logf("Gateway API %s standard channel installed (%d CRDs)", consts.BundleVersion, len(crds))
	return nil
}
