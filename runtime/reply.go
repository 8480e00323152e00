package runtime

import (
	"errors"
	"fmt"
	"strings"
)

// Errors a caller can branch on. Every reply HAProxy gives is classified
// into success or one of these; a reply that matches nothing known is
// ErrUnrecognizedReply, never success.
var (
	ErrNoSuchServer      = errors.New("no such server")
	ErrNoSuchBackend     = errors.New("no such backend")
	ErrInvalidArgument   = errors.New("invalid argument")
	ErrServerExists      = errors.New("server already exists")
	ErrNotDynamic        = errors.New("backend does not support dynamic servers")
	ErrUnknownCommand    = errors.New("unknown command")
	ErrPermission        = errors.New("permission denied")
	ErrNoSuchProcess     = errors.New("no such process")
	ErrCertNotReferenced = errors.New("certificate not referenced by the configuration")
	ErrBadCertificate    = errors.New("certificate payload rejected")
	ErrNoTransaction     = errors.New("no ongoing certificate transaction")
	ErrTransactionBusy   = errors.New("another certificate transaction is open")
	ErrCommitFailed      = errors.New("certificate commit failed")
	ErrUnrecognizedReply = errors.New("unrecognized reply")
	ErrNotExecuted       = errors.New("not executed: the master closed the session earlier in the batch")
	ErrReloadFailed      = errors.New("reload failed")
	ErrReloadUnconfirmed = errors.New("reload not confirmed before the deadline")
	ErrMasterUnreachable = errors.New("master socket unreachable")
	ErrNoSuchMap         = errors.New("no such map")
	ErrNoSuchMapEntry    = errors.New("no such map entry")
	ErrNoSuchTable       = errors.New("no such stick table")
	ErrNoSuchSession     = errors.New("no such session")
)

// knownErrors are the error sentences HAProxy 2.6 prints for the commands
// this package sends (src/server.c, src/cli.c, src/ssl_ckch.c, src/proxy.c,
// checked by hand on 2.6.12). They are matched as prefixes of the reply
// (after the payload prompts are stripped).
var knownErrors = []struct {
	prefix string
	err    error
}{
	{"No such server.", ErrNoSuchServer},
	{"No such backend.", ErrNoSuchBackend},
	{"Can't find backend.", ErrNoSuchBackend},
	{"Require 'backend/server'.", ErrInvalidArgument},
	{"Invalid addr", ErrInvalidArgument},
	{"'set server <srv> state' expects", ErrInvalidArgument},
	{"Absolute weight can only be between", ErrInvalidArgument},
	{"Relative weight can only be", ErrInvalidArgument},
	{"Empty weight string", ErrInvalidArgument},
	{"unknown keyword", ErrInvalidArgument},
	{"Backend must use a dynamic load balancing", ErrNotDynamic},
	{"Already exists a server with the same name", ErrServerExists},
	{"Unknown command", ErrUnknownCommand},
	{"Permission denied", ErrPermission},
	{"Can't find the target PID", ErrNoSuchProcess},
	{"Can't replace a certificate which is not referenced", ErrCertNotReferenced},
	{"Can't display the certificate", ErrCertNotReferenced},
	{"Can't display the CA file", ErrCertNotReferenced},
	{"unable to load certificate", ErrBadCertificate},
	{"unable to load", ErrBadCertificate},
	{"No ongoing transaction", ErrNoTransaction},
	{"The ongoing transaction is about", ErrTransactionBusy},
	{"Unknown map identifier", ErrNoSuchMap},
	{"entry not found.", ErrNoSuchMapEntry},
	{"Key not found.", ErrNoSuchMapEntry}, // "del map"
	// "add map" with a pattern the map's regex match refuses
	// (src/pattern.c: "regex '<re>' is invalid (error=...)").
	{"regex '", ErrInvalidArgument},
	// "show table <name>" and "shutdown session <id>" (src/stick_table.c,
	// src/stream.c; checked by hand on 2.6.12).
	{"No such table", ErrNoSuchTable},
	{"No such session", ErrNoSuchSession},
	{"Session pointer expected", ErrInvalidArgument},
}

// ReplyError is a classified error reply, with the command and HAProxy's own
// words.
type ReplyError struct {
	Command string
	Reply   string
	Err     error
}

func (e *ReplyError) Error() string {
	return fmt.Sprintf("%s: %v: %q", e.Command, e.Err, firstLine(e.Reply))
}

func (e *ReplyError) Unwrap() error { return e.Err }

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// classify turns a reply to c into nil or an error.
func classify(c Command, reply string) error {
	text := strings.TrimSpace(reply)
	for _, k := range knownErrors {
		if strings.HasPrefix(text, k.prefix) {
			return &ReplyError{Command: c.String(), Reply: text, Err: k.err}
		}
	}
	if c.expect == nil {
		return &ReplyError{Command: c.String(), Reply: text, Err: ErrUnrecognizedReply}
	}
	if err := c.expect(text); err != nil {
		return &ReplyError{Command: c.String(), Reply: text, Err: err}
	}
	return nil
}

func expectEmpty(text string) error {
	if text == "" {
		return nil
	}
	return ErrUnrecognizedReply
}

func expectPrefix(p string) func(string) error {
	return expectAny(p)
}

func expectAny(prefixes ...string) func(string) error {
	return func(text string) error {
		for _, p := range prefixes {
			// The reply is trimmed, so a prefix that ends in a newline
			// also matches a reply of just its first line.
			if strings.HasPrefix(text, p) || text == strings.TrimSuffix(p, "\n") {
				return nil
			}
		}
		return ErrUnrecognizedReply
	}
}

// expectMapEntries accepts the reply of "show map <file>": nothing (an
// empty map), or lines "<pointer> <key> <value>" (ParseMap).
func expectMapEntries(text string) error {
	if text == "" || strings.HasPrefix(text, "0x") {
		return nil
	}
	return ErrUnrecognizedReply
}

// expectSessions accepts the reply of "show sess": nothing, or lines that
// start with a stream's address (ParseSessions).
func expectSessions(text string) error {
	if text == "" || strings.HasPrefix(text, "0x") {
		return nil
	}
	return ErrUnrecognizedReply
}

// expectAddrChange accepts the replies of "set server addr": "IP changed
// from ...", "no need to change the addr ...", and their port variants.
var expectAddrChange = expectAny("IP changed from", "no need to change the addr")

// expectCommit accepts "Committing <file>" ending in "Success!"; a reply
// ending in "Failed!" is ErrCommitFailed (ssl_ckch.c cli_io_handler_commit_cert).
func expectCommit(text string) error {
	if !strings.HasPrefix(text, "Committing ") {
		return ErrUnrecognizedReply
	}
	switch {
	case strings.HasSuffix(text, "Success!"):
		return nil
	case strings.Contains(text, "Failed!"), strings.Contains(text, "Error"):
		return ErrCommitFailed
	}
	return ErrUnrecognizedReply
}
