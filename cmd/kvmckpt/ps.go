package main

import (
	"context"
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/kvmckpt/kvmckpt/checkpoint"
	"github.com/kvmckpt/kvmckpt/internal/term"
)

func cmdPS(ctx context.Context, e *env, args []string) error {
	fs, verbose := e.flags("ps")
	tf := targetFlags(fs)
	threads := fs.Bool("threads", false, "every thread, not only processes")
	profile := fs.String("profile", "auto", "kernel profile: auto, or a profile file")
	asJSON := fs.Bool("json", false, "print one JSON object on stdout")
	keyFile := keyFlag(fs)
	pos, err := e.parse(fs, verbose, args)
	if err != nil {
		return err
	}
	var res *checkpoint.PSResult
	from := "guest paused %d ms"
	switch {
	case len(pos) > 1:
		return usagef("give one checkpoint file, or --qmp or --domain")
	case len(pos) == 1:
		if *tf.qmp != "" || *tf.domain != "" {
			return usagef("give a checkpoint file or --qmp or --domain, not both")
		}
		key, err := loadKey(*keyFile)
		if err != nil {
			return err
		}
		from = "from the checkpoint"
		res, err = checkpoint.PSFile(ctx, pos[0], key, checkpoint.PSOptions{
			ScanOptions: checkpoint.ScanOptions{Profile: *profile, Log: e.log}, Threads: *threads})
		if err != nil {
			return err
		}
	default:
		target, err := tf.target()
		if err != nil {
			return err
		}
		res, err = checkpoint.PS(ctx, checkpoint.PSOptions{
			ScanOptions: checkpoint.ScanOptions{QMP: target.QMP, Domain: target.Domain, Connect: target.Connect, Profile: *profile, Log: e.log},
			Threads:     *threads,
		})
		if err != nil {
			return err
		}
	}
	if *asJSON {
		return e.printJSON(res)
	}
	// Everything but the numbers is the guest's text: escaped.
	w := tabwriter.NewWriter(e.stdout, 0, 0, 1, ' ', tabwriter.AlignRight)
	// The command is after the last tab: not a cell, so not aligned.
	head := "PID\tNSPID\tPPID\tS\tUID\tTHR\tRSS KiB\tCPU\t COMMAND"
	if *threads {
		head = "PID\tTID\tNSTID\tPPID\tS\tUID\tTHR\tRSS KiB\tCPU\t COMMAND"
	}
	fmt.Fprintln(w, head)
	for _, p := range res.Tasks {
		cmd := "[" + term.Escape(p.Comm) + "]"
		if !p.KernelThread {
			cmd = term.Escape(p.Comm)
			if len(p.Cmdline) > 0 {
				cmd = term.Escape(strings.Join(p.Cmdline, " "))
			}
			if p.CmdlineTruncated {
				cmd += " …"
			}
		}
		cpu := fmt.Sprint(p.CPU)
		if p.OnCPU {
			cpu += "*"
		}
		ids := fmt.Sprintf("%d\t%d\t%d", p.TGID, p.NsTGID, p.PPID)
		if *threads {
			ids = fmt.Sprintf("%d\t%d\t%d\t%d", p.TGID, p.PID, p.NsPID, p.PPID)
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%d\t%d\t%s\t %s\n", ids, p.State, p.EUID, p.Threads, p.RSSPages*4, cpu, cmd)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if from != "from the checkpoint" {
		from = fmt.Sprintf(from, res.PauseMS)
	}
	fmt.Fprintf(e.stderr, "%d tasks, %s; profile %s\n", len(res.Tasks), from, term.Escape(res.Profile))
	return nil
}
