package spoa

import (
	"errors"
	"net"
	"time"

	"go.uber.org/zap"
)

// trackingListener hands Serve connections that the Authorizer can close,
// and retries Accept errors other than a closed listener (a temporary one,
// e.g. EMFILE, must not stop the agent).
type trackingListener struct {
	net.Listener
	a *Authorizer
}

const (
	acceptRetryMin = 5 * time.Millisecond
	acceptRetryMax = time.Second
)

func (l *trackingListener) Accept() (net.Conn, error) {
	var delay time.Duration
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil, err
			}
			delay = min(max(2*delay, acceptRetryMin), acceptRetryMax)
			l.a.log.Warn("spoe agent accept failed, retrying", zap.Error(err), zap.Duration("retry_in", delay))
			time.Sleep(delay)
			continue
		}
		tc := &trackedConn{Conn: c, ln: l, a: l.a}
		l.a.connMu.Lock()
		if l.a.closed {
			l.a.connMu.Unlock()
			c.Close()
			return nil, net.ErrClosed
		}
		l.a.conns[tc] = struct{}{}
		l.a.connMu.Unlock()
		return tc, nil
	}
}

// trackedConn removes itself from the Authorizer's set when closed. Never
// close one with connMu held.
type trackedConn struct {
	net.Conn
	ln *trackingListener
	a  *Authorizer
}

func (c *trackedConn) Close() error {
	err := c.Conn.Close()
	c.a.connMu.Lock()
	delete(c.a.conns, c)
	c.a.connMu.Unlock()
	return err
}
