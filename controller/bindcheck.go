package controller

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/haproxy-connect/haproxy-connect/certs"
)

// bindResult is what a handshake with the public listener found.
type bindResult int

const (
	bindOK bindResult = iota
	// bindNoClientCertRequest: the listener did not ask for a client
	// certificate, so no caller's identity reaches the SPOE agent and every
	// new connection is refused.
	bindNoClientCertRequest
	// bindWrongLeaf: the listener serves another leaf than the one just
	// committed.
	bindWrongLeaf
	// bindUnreachable: no handshake could be made; nothing is known.
	bindUnreachable
	numBindResults
)

func (r bindResult) String() string {
	switch r {
	case bindOK:
		return "ok"
	case bindNoClientCertRequest:
		return "no_client_cert_request"
	case bindWrongLeaf:
		return "wrong_leaf"
	}
	return "unreachable"
}

// bindCheckTimeout bounds the handshake; the loop waits for it.
const bindCheckTimeout = 2 * time.Second

// checkBind makes one TLS handshake with the public listener at bind, as a
// caller without a certificate, and reports whether the listener asked for
// a client certificate and served the leaf with serial wantSerial. The
// listener then refuses the handshake ("certificate required"), so the
// check never reaches the SPOE agent or the application. served is the
// serial it saw, for the log.
func checkBind(ctx context.Context, bind netip.AddrPort, wantSerial string) (res bindResult, served string, err error) {
	addr := bind.Addr()
	switch {
	case addr.IsUnspecified() && addr.Is4():
		addr = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	case addr.IsUnspecified():
		addr = netip.IPv6Loopback()
	}
	asked := false
	cfg := &tls.Config{
		// The listener's chain is not what is checked here, only which
		// leaf it serves and whether it asks for ours.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return errors.New("no server certificate")
			}
			c, err := x509.ParseCertificate(raw[0])
			if err != nil {
				return err
			}
			served = certs.SerialOf(c)
			return nil
		},
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			asked = true
			return &tls.Certificate{}, nil // none: the listener ends the handshake
		},
	}
	ctx, cancel := context.WithTimeout(ctx, bindCheckTimeout)
	defer cancel()
	d := tls.Dialer{NetDialer: &net.Dialer{}, Config: cfg}
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(addr.String(), strconv.Itoa(int(bind.Port()))))
	if conn != nil {
		conn.Close()
	}
	switch {
	case served == "":
		if err == nil {
			err = errors.New("no server certificate seen")
		}
		return bindUnreachable, "", err
	case served != wantSerial:
		return bindWrongLeaf, served, nil
	case !asked:
		return bindNoClientCertRequest, served, nil
	}
	return bindOK, served, nil
}
