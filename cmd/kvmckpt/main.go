// Command kvmckpt checkpoints KVM/QEMU virtual machines by looking inside
// the guest: it saves only the pages the guest kernel uses.
//
//	kvmckpt scan    (--qmp PATH | --domain NAME [--connect URI]) [--json] [--profile auto|FILE] [--require-introspection] [--map FILE.png]
//	kvmckpt save    (--qmp PATH | --domain NAME [--connect URI]) -o FILE [--live [--max-pause D] [--no-predict]] [--profile auto|FILE] [--require-introspection] [--keep-paused | --quit] [--parent FILE] [--compress auto|lz4|none] [--json]
//	kvmckpt restore -i FILE (--qmp PATH | --launch [--ram-dir DIR] [--qemu PATH] | --domain NAME [--connect URI]) [--resume] [--json]
//	kvmckpt ps      (--qmp PATH | --domain NAME [--connect URI] | FILE) [--threads] [--json]
//	kvmckpt export  FILE -o OUT --format qemu|libvirt [--xml DOMAIN.xml] [--json]
//	kvmckpt inspect FILE [--parent FILE]... [--json]
//	kvmckpt verify  FILE [--parent FILE]...
//	kvmckpt flatten FILE -o OUT [--parent FILE]... [--compress lz4|none] [--json]
//	kvmckpt resume  (--qmp PATH | --domain NAME [--connect URI])
//	kvmckpt profile build --kernel PATH [-o FILE] | list | show NAME|FILE
//
// A checkpoint FILE may be an object, s3://BUCKET/KEY, in any command;
// --s3-endpoint URL names a store that is not AWS (credentials and region
// come from the AWS_* variables and the shared AWS files).
//
// Exit codes: 0 success; 1 the operation failed; 2 usage error; 3 the
// checkpoint is invalid or corrupt; 4 the guest is busy (another kvmckpt
// holds it) or not in a state to be saved or restored; 130 interrupted.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/kvmckpt/kvmckpt/internal/term"
)

func main() {
	ctx, cancel := context.WithCancelCause(context.Background())
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		sig := <-sigs
		// Stop in order: the guest goes back to its run state and
		// temporary files go. A second signal is caught too, so it cannot
		// cut that short.
		cancel(fmt.Errorf("%w (signal: %v)", errInterrupted, sig))
	}()
	stopProfiles, err := startProfiles()
	if err == nil {
		err = run(ctx, os.Stdout, os.Stderr, os.Args[1:])
		stopProfiles()
	}
	if err != nil && !errors.Is(err, errSilent) {
		if cause := context.Cause(ctx); cause != nil && !errors.Is(err, errInterrupted) {
			err = fmt.Errorf("%w: %w", cause, err)
		}
		// Errors quote guest, QEMU and checkpoint text: escaped.
		fmt.Fprintf(os.Stderr, "kvmckpt: %s\n", term.EscapeText(err.Error()))
	}
	os.Exit(exitCode(ctx, err))
}

// errInterrupted is the cause of a context cancelled by a signal.
var errInterrupted = errors.New("interrupted")
