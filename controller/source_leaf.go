package controller

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/certs"
)

func (c *Controller) fetchLeaf(ctx context.Context, service string, cur cursor) (*certs.Bundle, cursor, error) {
	leaf, meta, err := c.consul.Agent().ConnectCALeaf(service, (&api.QueryOptions{WaitIndex: cur.index, WaitTime: 5 * time.Minute}).WithContext(ctx))
	if err != nil {
		return nil, cur, fmt.Errorf("leaf certificate for %s: %w", service, err)
	}
	b, err := certs.NewBundle(leaf.CertPEM, leaf.PrivateKeyPEM, time.Now())
	if err != nil {
		// Bad material from Consul: keep what is applied, try again later.
		return nil, cur, fmt.Errorf("leaf certificate for %s rejected: %w", service, err)
	}
	return &b, cursor{index: meta.LastIndex}, nil
}
