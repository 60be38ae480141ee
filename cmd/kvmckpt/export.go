package main

import (
	"context"
	"fmt"

	"github.com/kvmckpt/kvmckpt/checkpoint"
	"github.com/kvmckpt/kvmckpt/internal/safefile"
)

func cmdExport(ctx context.Context, e *env, args []string) error {
	fs, verbose := e.flags("export")
	out := fs.String("o", "", "file to write")
	format := fs.String("format", "", "qemu: a migration stream (load it with -incoming \"exec:cat FILE\"); libvirt: a save image (virsh restore FILE)")
	xmlFile := fs.String("xml", "", "with --format libvirt: the domain's XML, for a checkpoint not saved with --domain (virsh dumpxml --migratable NAME)")
	paused := fs.Bool("paused", false, "with --format libvirt: virsh restore leaves the guest paused (by default it runs)")
	asJSON := fs.Bool("json", false, "print one JSON object on stdout")
	keyFile := keyFlag(fs)
	pos, err := e.parse(fs, verbose, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("give one checkpoint file: kvmckpt export FILE -o OUT --format qemu|libvirt")
	}
	if err := required("o", *out); err != nil {
		return err
	}
	if *format != checkpoint.FormatQEMU && *format != checkpoint.FormatLibvirt {
		return usagef("--format is qemu or libvirt")
	}
	if (*xmlFile != "" || *paused) && *format != checkpoint.FormatLibvirt {
		return usagef("--xml and --paused go with --format libvirt")
	}
	key, err := loadKey(*keyFile)
	if err != nil {
		return err
	}
	var xml []byte
	if *xmlFile != "" {
		if xml, err = safefile.ReadFile(*xmlFile, 16<<20); err != nil {
			return fmt.Errorf("read domain XML: %w", err)
		}
	}
	bar := newProgress(e.stderr, "exporting")
	res, err := checkpoint.Export(ctx, checkpoint.ExportOptions{Input: pos[0], Key: key, Output: *out, Format: *format,
		DomainXML: xml, Paused: *paused, Progress: bar.update, Log: e.log})
	bar.done()
	if err != nil {
		return err
	}
	if *asJSON {
		return e.printJSON(res)
	}
	fmt.Fprintf(e.stdout, "wrote %s (%s, %d pages) in %d ms\n", res.Output, mib(res.Bytes), res.PagesWritten+res.PagesFilled, res.DurationMS)
	switch res.Format {
	case checkpoint.FormatQEMU:
		fmt.Fprintf(e.stdout, "load it into a new QEMU started like the source with: -incoming \"exec:cat %s\" (then cont)\n", res.Output)
	case checkpoint.FormatLibvirt:
		fmt.Fprintf(e.stdout, "restore it with: virsh restore %s\n", res.Output)
	}
	return nil
}
