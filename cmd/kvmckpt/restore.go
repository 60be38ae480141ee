package main

import (
	"context"
	"fmt"

	"github.com/kvmckpt/kvmckpt/checkpoint"
)

func cmdRestore(ctx context.Context, e *env, args []string) error {
	fs, verbose := e.flags("restore")
	in := fs.String("i", "", "checkpoint file to restore")
	qmpPath := fs.String("qmp", "", "QMP socket of a QEMU started with -incoming defer -S")
	resume := fs.Bool("resume", false, "start the guest once it is restored")
	asJSON := fs.Bool("json", false, "print one JSON object on stdout")
	if _, err := e.parse(fs, verbose, args); err != nil {
		return err
	}
	if err := required("i", *in); err != nil {
		return err
	}
	if err := required("qmp", *qmpPath); err != nil {
		return err
	}
	bar := newProgress(e.stderr, "restoring")
	res, err := checkpoint.Restore(ctx, checkpoint.RestoreOptions{Input: *in, QMP: *qmpPath, Resume: *resume, Progress: bar.update, Log: e.log})
	bar.done()
	if err != nil {
		return err
	}
	if *asJSON {
		return e.printJSON(res)
	}
	fmt.Fprintf(e.stdout, "restored %d of %d pages and %s of device state in %d ms (pages %d, device state %d); guest is %s\n",
		res.PagesRestored, res.PagesTotal, mib(res.DeviceStateBytes), res.DurationMS, res.PagesMS, res.DeviceStateMS, res.GuestState)
	return nil
}

func cmdResume(ctx context.Context, e *env, args []string) error {
	fs, verbose := e.flags("resume")
	qmpPath := fs.String("qmp", "", "QMP socket of the guest")
	if _, err := e.parse(fs, verbose, args); err != nil {
		return err
	}
	if err := required("qmp", *qmpPath); err != nil {
		return err
	}
	state, err := checkpoint.Resume(ctx, *qmpPath)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "guest is %s\n", state)
	return nil
}
