package controller

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/watch"
)

func (c *Controller) fetchLeaf(ctx context.Context, service string, cur watch.Cursor) (*certs.Bundle, watch.Cursor, error) {
	leaf, meta, err := c.consul.Agent().ConnectCALeaf(service, (&api.QueryOptions{WaitIndex: cur.Index, WaitTime: 5 * time.Minute}).WithContext(ctx))
	if err != nil {
		return nil, cur, fmt.Errorf("leaf certificate for %s: %w", service, err)
	}
	b, err := certs.NewBundle(leaf.CertPEM, leaf.PrivateKeyPEM, time.Now())
	if err != nil {
		// Bad material from Consul: keep what is applied, try again later.
		return nil, cur, fmt.Errorf("leaf certificate for %s rejected: %w", service, err)
	}
	return &b, watch.Cursor{Index: meta.LastIndex}, nil
}
