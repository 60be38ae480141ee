package main

import (
	"context"
	"fmt"

	"github.com/kvmckpt/kvmckpt/checkpoint"
	"github.com/kvmckpt/kvmckpt/internal/term"
	"github.com/kvmckpt/kvmckpt/writer"
)

func cmdInspect(ctx context.Context, e *env, args []string) error {
	fs, verbose := e.flags("inspect")
	asJSON := fs.Bool("json", false, "print one JSON object on stdout")
	keyFile := keyFlag(fs)
	parents := parentsFlag(fs)
	pos, err := e.parse(fs, verbose, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("inspect takes one checkpoint file")
	}
	key, err := loadKey(*keyFile)
	if err != nil {
		return err
	}
	info, err := checkpoint.Inspect(pos[0], key, *parents)
	if err != nil {
		return err
	}
	if *asJSON {
		return e.printJSON(info)
	}
	w := e.stdout
	// Every string below but the file's own path comes from the
	// checkpoint: untrusted, so escaped for the terminal.
	esc := term.Escape
	fmt.Fprintf(w, "checkpoint:   %s (%s)\n", esc(info.Path), mib(info.FileBytes))
	fmt.Fprintf(w, "created:      %s\n", info.Created.Format("2006-01-02 15:04:05 MST"))
	fmt.Fprintf(w, "kernel:       %s\n", esc(info.KernelBanner))
	fmt.Fprintf(w, "profile:      %s\n", esc(info.Profile))
	fmt.Fprintf(w, "qemu:         %s, machine %s\n", esc(info.QEMUVersion), esc(info.MachineType))
	for _, r := range info.Regions {
		fmt.Fprintf(w, "ram:          %s %d MiB (source %s)\n", esc(r.ID), r.Size>>20, esc(r.MemPath))
		for _, m := range r.Mappings {
			fmt.Fprintf(w, "                guest-physical [%#x, %#x) at offset %#x\n", m.GPA, m.GPA+m.Size, m.Offset)
		}
	}
	p := info.Pages
	fmt.Fprintf(w, "pages:        %d total, %d saved, %d free (%d buddy, %d per-CPU), %d zero, %d hole\n",
		p.Total, p.Saved, p.FreeBuddy+p.FreePCP, p.FreeBuddy, p.FreePCP, p.Zero, p.Hole)
	enc := "not encrypted"
	if info.Encrypted {
		enc = "AES-256-GCM"
	}
	fmt.Fprintf(w, "storage:      %d chunks, %s, %s, fill byte %#02x, device state %s\n", info.Chunks, info.Compression, enc, info.FillByte, mib(info.DeviceStateBytes))
	fmt.Fprintf(w, "id:           %s\n", info.ID)
	for i, l := range info.Chain {
		role := "parent"
		if i == 0 {
			role = "this"
		}
		fmt.Fprintf(w, "chain:        %-6s depth %2d  %s  %d stored, %d in use, %d restored from it  %s (%s)\n",
			role, l.Depth, l.Created.Format("2006-01-02 15:04:05"), l.PagesStored, l.PagesInUse, l.PagesRestored, esc(l.Path), mib(l.FileBytes))
	}
	if info.ChainError != "" {
		fmt.Fprintf(w, "chain:        BROKEN: %s\n", esc(info.ChainError))
	}
	if info.LibvirtDomain != "" {
		fmt.Fprintf(w, "libvirt:      domain %s (its XML recorded)\n", esc(info.LibvirtDomain))
		fmt.Fprintf(w, "restore into: kvmckpt restore -i %s --domain %s --resume  (or export --format libvirt, then virsh restore)\n",
			term.ShellQuote(info.Path), term.ShellQuote(info.LibvirtDomain))
	}
	if len(info.RestoreCommandLine) > 0 {
		fmt.Fprintf(w, "restore into: %s\n", term.ShellJoin(info.RestoreCommandLine))
		fmt.Fprintf(w, "              (give it its own mem-path, if it has one, and QMP socket, then: kvmckpt restore -i %s --qmp SOCKET --resume)\n", term.ShellQuote(info.Path))
	}
	return nil
}

func cmdVerify(ctx context.Context, e *env, args []string) error {
	fs, verbose := e.flags("verify")
	keyFile := keyFlag(fs)
	parents := parentsFlag(fs)
	pos, err := e.parse(fs, verbose, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("verify takes one checkpoint file")
	}
	key, err := loadKey(*keyFile)
	if err != nil {
		return err
	}
	bar := newProgress(e.stderr, "verifying")
	err = checkpoint.Verify(pos[0], key, *parents, bar.update)
	bar.done()
	if err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "%s: every checksum holds\n", pos[0])
	return nil
}

func cmdFlatten(ctx context.Context, e *env, args []string) error {
	fs, verbose := e.flags("flatten")
	out := fs.String("o", "", "checkpoint file to write, with no parent")
	compress := fs.String("compress", "lz4", "page compression: lz4 or none")
	asJSON := fs.Bool("json", false, "print one JSON object on stdout")
	parents := parentsFlag(fs)
	pos, err := e.parse(fs, verbose, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("flatten takes one checkpoint file")
	}
	if err := required("o", *out); err != nil {
		return err
	}
	if *compress != "lz4" && *compress != "none" {
		return usagef("--compress must be lz4 or none, not %q", *compress)
	}
	bar := newProgress(e.stderr, "flattening")
	res, err := checkpoint.Flatten(ctx, checkpoint.FlattenOptions{
		Input: pos[0], Output: *out, Parents: *parents,
		Compression: writer.Compression(*compress), Progress: bar.update,
	})
	bar.done()
	if err != nil {
		return err
	}
	if *asJSON {
		return e.printJSON(res)
	}
	fmt.Fprintf(e.stdout, "flattened a chain of %d checkpoints into %s: %d of %d pages, %s, in %d ms\n",
		res.Links, res.Output, res.PagesSaved, res.PagesTotal, mib(res.BytesWritten), res.DurationMS)
	return nil
}
