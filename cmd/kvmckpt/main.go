// Command kvmckpt checkpoints KVM/QEMU virtual machines by looking inside
// the guest: it saves only the pages the guest kernel uses.
//
//	kvmckpt scan    --qmp PATH [--json] [--profile auto|FILE] [--map FILE.png]
//	kvmckpt save    --qmp PATH -o FILE [--profile auto|FILE] [--keep-paused | --quit] [--compress lz4|none] [--json]
//	kvmckpt restore -i FILE (--qmp PATH | --launch [--ram-dir DIR]) [--resume] [--json]
//	kvmckpt inspect FILE [--json]
//	kvmckpt verify  FILE
//	kvmckpt resume  --qmp PATH
//	kvmckpt profile build --kernel PATH [-o FILE] | list | show NAME|FILE
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
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Stdout, os.Stderr, os.Args[1:])
	stop()
	if err != nil && !errors.Is(err, errSilent) {
		fmt.Fprintf(os.Stderr, "kvmckpt: %v\n", err)
	}
	os.Exit(exitCode(ctx, err))
}
