package main

// A throw-away PKI for one control plane: a CA, the apiserver's serving certificate, client
// certificates for the admin and the controller manager, and the service-account signing key.
// Everything is generated at each start, so a state folder never outlives its certificates; a
// restart (--restart) loads them back instead, so that clients keep trusting the API server.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

type keyPair struct {
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	certPEM []byte
	keyPEM  []byte
}

type pki struct {
	dir                 string
	ca, serving         keyPair
	admin, kcm          keyPair
	saKeyPath, saPubKey string
}

func (p *pki) path(name string) string { return filepath.Join(p.dir, name) }

// newPKI writes ca.crt, apiserver.{crt,key}, admin.{crt,key}, sa.{key,pub} into dir.
func newPKI(dir string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	p := &pki{dir: dir, saKeyPath: filepath.Join(dir, "sa.key"), saPubKey: filepath.Join(dir, "sa.pub")}
	var err error
	if p.ca, err = issue(nil, x509.Certificate{
		Subject:               pkix.Name{CommonName: "kaos-controlplane-ca"},
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}); err != nil {
		return nil, err
	}
	// The in-cluster names are there so that a client that resolves them (e.g. through a
	// port-forward or /etc/hosts) can verify the certificate as on a real cluster.
	if p.serving, err = issue(&p.ca, x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		DNSNames: []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP(serviceClusterIP)},
	}); err != nil {
		return nil, err
	}
	// system:masters bypasses authorization: the admin is the test harness, and the
	// controller manager then needs no per-controller service-account tokens.
	client := func(cn string) x509.Certificate {
		return x509.Certificate{
			Subject:     pkix.Name{CommonName: cn, Organization: []string{"system:masters"}},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
			KeyUsage:    x509.KeyUsageDigitalSignature,
		}
	}
	if p.admin, err = issue(&p.ca, client("kaos-admin")); err != nil {
		return nil, err
	}
	if p.kcm, err = issue(&p.ca, client("system:kube-controller-manager")); err != nil {
		return nil, err
	}
	sa, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	saKey, err := x509.MarshalECPrivateKey(sa)
	if err != nil {
		return nil, err
	}
	saPub, err := x509.MarshalPKIXPublicKey(&sa.PublicKey)
	if err != nil {
		return nil, err
	}
	files := map[string][]byte{
		"ca.crt": p.ca.certPEM,
		// A throw-away CA: a real node (e2e/node.py) signs its kubelet's serving certificate with it.
		"ca.key":        p.ca.keyPEM,
		"apiserver.crt": p.serving.certPEM,
		"apiserver.key": p.serving.keyPEM,
		"admin.crt":     p.admin.certPEM,
		"admin.key":     p.admin.keyPEM,
		"sa.key":        pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: saKey}),
		"sa.pub":        pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub}),
	}
	for name, data := range files {
		if err := os.WriteFile(p.path(name), data, 0o600); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// loadPKI reads back what newPKI wrote into dir; the controller manager's certificate, kept in
// no file, is issued again by the same CA.
func loadPKI(dir string) (*pki, error) {
	p := &pki{dir: dir, saKeyPath: filepath.Join(dir, "sa.key"), saPubKey: filepath.Join(dir, "sa.pub")}
	var err error
	for _, kp := range []struct {
		into *keyPair
		name string
	}{{&p.ca, "ca"}, {&p.serving, "apiserver"}, {&p.admin, "admin"}} {
		if *kp.into, err = loadKeyPair(p.path(kp.name+".crt"), p.path(kp.name+".key")); err != nil {
			return nil, err
		}
	}
	p.kcm, err = issue(&p.ca, x509.Certificate{
		Subject:     pkix.Name{CommonName: "system:kube-controller-manager", Organization: []string{"system:masters"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		KeyUsage:    x509.KeyUsageDigitalSignature,
	})
	if err != nil {
		return nil, err
	}
	return p, nil
}

func loadKeyPair(certPath, keyPath string) (keyPair, error) {
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return keyPair{}, err
	}
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return keyPair{}, err
	}
	certBlock, _ := pem.Decode(certPEM)
	keyBlock, _ := pem.Decode(keyPEM)
	if certBlock == nil || keyBlock == nil {
		return keyPair{}, fmt.Errorf("%s or %s is not PEM", certPath, keyPath)
	}
	cert, err := x509.ParseCertificate(certBlock.Bytes)
	if err != nil {
		return keyPair{}, fmt.Errorf("%s: %w", certPath, err)
	}
	key, err := x509.ParseECPrivateKey(keyBlock.Bytes)
	if err != nil {
		return keyPair{}, fmt.Errorf("%s: %w", keyPath, err)
	}
	return keyPair{cert: cert, key: key, certPEM: certPEM, keyPEM: keyPEM}, nil
}

// issue creates a key pair and a certificate from tmpl, signed by parent (self-signed when nil).
func issue(parent *keyPair, tmpl x509.Certificate) (keyPair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return keyPair{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return keyPair{}, err
	}
	tmpl.SerialNumber = serial
	tmpl.NotBefore = time.Now().Add(-time.Hour) // tolerate small clock differences
	tmpl.NotAfter = time.Now().Add(10 * 365 * 24 * time.Hour)
	signer, signerKey := &tmpl, key
	if parent != nil {
		signer, signerKey = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, signer, &key.PublicKey, signerKey)
	if err != nil {
		return keyPair{}, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return keyPair{}, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return keyPair{}, err
	}
	return keyPair{
		cert:    cert,
		key:     key,
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		keyPEM:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
	}, nil
}

// writeKubeconfig writes a self-contained kubeconfig (certificates inline) for the given
// client, atomically, so a reader never sees half a file.
func writeKubeconfig(path, server string, ca []byte, client keyPair) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["kaos"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: ca}
	cfg.AuthInfos["kaos-admin"] = &clientcmdapi.AuthInfo{
		ClientCertificateData: client.certPEM,
		ClientKeyData:         client.keyPEM,
	}
	cfg.Contexts["kaos"] = &clientcmdapi.Context{Cluster: "kaos", AuthInfo: "kaos-admin", Namespace: "default"}
	cfg.CurrentContext = "kaos"
	tmp := path + ".tmp"
	if err := clientcmd.WriteToFile(*cfg, tmp); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	return os.Rename(tmp, path)
}
