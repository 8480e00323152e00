package controller

import (
	"context"
	"fmt"
	"time"

	"github.com/hashicorp/consul/api"

	"github.com/haproxy-connect/haproxy-connect/certs"
	"github.com/haproxy-connect/haproxy-connect/watch"
)

func (c *Controller) fetchRoots(ctx context.Context, cur watch.Cursor) (*certs.Roots, watch.Cursor, error) {
	list, meta, err := c.consul.Agent().ConnectCARoots((&api.QueryOptions{WaitIndex: cur.Index, WaitTime: 5 * time.Minute}).WithContext(ctx))
	if err != nil {
		return nil, cur, fmt.Errorf("CA roots: %w", err)
	}
	pems := make([]string, 0, len(list.Roots))
	for _, r := range list.Roots {
		pems = append(pems, r.RootCertPEM)
	}
	roots, err := certs.NewRoots(pems)
	if err != nil {
		return nil, cur, fmt.Errorf("CA roots rejected: %w", err)
	}
	roots.TrustDomain = list.TrustDomain
	return &roots, watch.Cursor{Index: meta.LastIndex}, nil
}
