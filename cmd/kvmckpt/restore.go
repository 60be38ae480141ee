package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/kvmckpt/kvmckpt/checkpoint"
)

func cmdRestore(ctx context.Context, e *env, args []string) error {
	fs, verbose := e.flags("restore")
	in := fs.String("i", "", "checkpoint file to restore")
	qmpPath := fs.String("qmp", "", "QMP socket of a QEMU started with -incoming defer -S")
	domain := fs.String("domain", "", "restore into libvirt as this domain (not running), through a libvirt save image")
	connect := fs.String("connect", "", "with --domain: libvirt connection URI")
	launch := fs.Bool("launch", false, "start the target QEMU from the command line recorded in the checkpoint")
	ramDir := fs.String("ram-dir", "", "with --launch: directory for the new RAM file and QMP socket (default /dev/shm)")
	qemu := fs.String("qemu", "", "with --launch: the QEMU binary to run (default: the recorded emulator's name, found in PATH)")
	resume := fs.Bool("resume", false, "start the guest once it is restored")
	asJSON := fs.Bool("json", false, "print one JSON object on stdout")
	keyFile := keyFlag(fs)
	parents := parentsFlag(fs)
	if _, err := e.parse(fs, verbose, args); err != nil {
		return err
	}
	if err := required("i", *in); err != nil {
		return err
	}
	n := 0
	for _, given := range []bool{*launch, *qmpPath != "", *domain != ""} {
		if given {
			n++
		}
	}
	if n != 1 {
		return usagef("give one of --qmp (a waiting QEMU), --launch (start one) or --domain (a libvirt domain)")
	}
	if *connect != "" && *domain == "" {
		return usagef("--connect goes with --domain")
	}
	if (*ramDir != "" || *qemu != "") && !*launch {
		return usagef("--ram-dir and --qemu go with --launch")
	}
	key, err := loadKey(*keyFile)
	if err != nil {
		return err
	}
	bar := newProgress(e.stderr, "restoring")
	opts := checkpoint.RestoreOptions{Input: *in, QMP: *qmpPath, Domain: *domain, Connect: *connect, Resume: *resume, Key: key, Parents: *parents, Progress: bar.update, Log: e.log}
	if *launch {
		l, err := checkpoint.RestoreLaunch(ctx, checkpoint.LaunchOptions{RestoreOptions: opts, RAMDir: *ramDir, QEMU: *qemu})
		bar.done()
		if err != nil {
			return err
		}
		if *asJSON {
			return e.printJSON(l)
		}
		fmt.Fprintf(e.stdout, "started QEMU (pid %d) with RAM in %s, log %s\n", l.PID, strings.Join(l.RAMFiles, ", "), l.Log)
		fmt.Fprintf(e.stdout, "restored %d of %d pages in %d ms; guest is %s; QMP: %s\n", l.PagesRestored, l.PagesTotal, l.DurationMS, l.GuestState, l.QMP)
		return nil
	}
	restore := checkpoint.Restore
	if *domain != "" {
		restore = checkpoint.RestoreDomain
	}
	res, err := restore(ctx, opts)
	bar.done()
	if err != nil {
		return err
	}
	if *asJSON {
		return e.printJSON(res)
	}
	from := ""
	if res.Links > 1 {
		from = fmt.Sprintf(" from a chain of %d checkpoints", res.Links)
	}
	fmt.Fprintf(e.stdout, "restored %d of %d pages%s and %s of device state in %d ms (pages %d, device state %d); guest is %s\n",
		res.PagesRestored, res.PagesTotal, from, mib(res.DeviceStateBytes), res.DurationMS, res.PagesMS, res.DeviceStateMS, res.GuestState)
	return nil
}

func cmdResume(ctx context.Context, e *env, args []string) error {
	fs, verbose := e.flags("resume")
	tf := targetFlags(fs)
	if _, err := e.parse(fs, verbose, args); err != nil {
		return err
	}
	target, err := tf.target()
	if err != nil {
		return err
	}
	state, err := checkpoint.Resume(ctx, target)
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "guest is %s\n", state)
	return nil
}
