// Command consul builds the Consul CLI from the github.com/hashicorp/consul
// module, for tests and the demo (Consul is not packaged by Debian). It lives
// in its own module so the sidecar's go.mod stays small.
package main

import (
	"fmt"
	"io"
	"log"
	"os"

	mcli "github.com/mitchellh/cli"

	"github.com/hashicorp/consul/command"
	"github.com/hashicorp/consul/command/cli"
	"github.com/hashicorp/consul/command/version"
)

func main() {
	log.SetOutput(io.Discard)
	ui := &cli.BasicUI{BasicUi: mcli.BasicUi{Writer: os.Stdout, ErrorWriter: os.Stderr}}
	cmds := command.RegisteredCommands(ui)
	names := make([]string, 0, len(cmds))
	for c := range cmds {
		names = append(names, c)
	}
	c := &mcli.CLI{
		Args:        os.Args[1:],
		Commands:    cmds,
		Name:        "consul",
		HelpFunc:    mcli.FilteredHelpFunc(names, mcli.BasicHelpFunc("consul")),
		HelpWriter:  os.Stdout,
		ErrorWriter: os.Stderr,
	}
	if c.IsVersion() {
		os.Exit(version.New(ui).Run(nil))
	}
	code, err := c.Run()
	if err != nil {
		fmt.Fprintf(os.Stderr, "Error executing CLI: %v\n", err)
		os.Exit(1)
	}
	os.Exit(code)
}
