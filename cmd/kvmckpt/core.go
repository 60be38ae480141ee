package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/kvmckpt/kvmckpt/checkpoint"
	"github.com/kvmckpt/kvmckpt/internal/term"
)

func cmdCore(ctx context.Context, e *env, args []string) error {
	fs, verbose := e.flags("core")
	tf := targetFlags(fs)
	pid := fs.Int("pid", 0, "the process's id, as `kvmckpt ps` lists it")
	out := fs.String("o", "", "core file to write")
	profile := fs.String("profile", "auto", "kernel profile: auto, or a profile file")
	asJSON := fs.Bool("json", false, "print one JSON object on stdout")
	keyFile := keyFlag(fs)
	pos, err := e.parse(fs, verbose, args)
	if err != nil {
		return err
	}
	switch {
	case *pid <= 0 || *pid > 1<<22:
		return usagef("--pid is required: the id of a guest process, as `kvmckpt ps` lists it")
	case *out == "":
		return usagef("-o is required: the core file to write")
	case len(pos) > 1:
		return usagef("give one checkpoint file, or --qmp or --domain")
	}
	opt := checkpoint.CoreOptions{PID: int32(*pid), Output: *out,
		ScanOptions: checkpoint.ScanOptions{Profile: *profile, Log: e.log}}
	var res *checkpoint.CoreResult
	if len(pos) == 1 {
		if *tf.qmp != "" || *tf.domain != "" {
			return usagef("give a checkpoint file or --qmp or --domain, not both")
		}
		key, err := loadKey(*keyFile)
		if err != nil {
			return err
		}
		if res, err = checkpoint.CoreFile(ctx, pos[0], key, opt); err != nil {
			return err
		}
	} else {
		target, err := tf.target()
		if err != nil {
			return err
		}
		opt.QMP, opt.Domain, opt.Connect = target.QMP, target.Domain, target.Connect
		if res, err = checkpoint.Core(ctx, opt); err != nil {
			return err
		}
	}
	if *asJSON {
		return e.printJSON(res)
	}
	var regs []string
	for _, t := range res.Threads {
		if t.Registers == "vcpu" {
			regs = append(regs, fmt.Sprintf("thread %d from vCPU %d", t.TID, t.CPU))
		}
	}
	from := "from the checkpoint"
	if len(pos) == 0 {
		from = fmt.Sprintf("guest paused %d ms", res.PauseMS)
	}
	fmt.Fprintf(e.stdout, "%s: core of pid %d (%s), %d threads, %d areas, %.1f MiB in memory, %.1f MiB absent; %s\n",
		term.Escape(res.Output), res.PID, term.Escape(strings.Join(res.Cmdline, " ")), len(res.Threads), res.Areas,
		float64(res.PresentBytes)/(1<<20), float64(res.AbsentBytes)/(1<<20), from)
	if len(regs) > 0 {
		fmt.Fprintf(e.stdout, "registers of %s (running in user mode); the others' from their kernel stacks\n", strings.Join(regs, ", "))
	}
	return nil
}
