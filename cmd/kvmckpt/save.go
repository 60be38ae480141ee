package main

import (
	"context"
	"flag"
	"fmt"
	"strings"

	"github.com/kvmckpt/kvmckpt/checkpoint"
	"github.com/kvmckpt/kvmckpt/internal/term"
	"github.com/kvmckpt/kvmckpt/writer"
)

func cmdSave(ctx context.Context, e *env, args []string) error {
	fs, verbose := e.flags("save")
	tf := targetFlags(fs)
	out := fs.String("o", "", "checkpoint file to write")
	profile := fs.String("profile", "auto", "kernel profile: auto, or a profile file")
	requireIntro := fs.Bool("require-introspection", false, "fail rather than save every non-zero page when the guest kernel cannot be read")
	keepPaused := fs.Bool("keep-paused", false, "leave the guest paused after the save")
	quit := fs.Bool("quit", false, "end QEMU once the checkpoint is durable")
	compress := fs.String("compress", "auto", "page compression: auto (LZ4 as far as it shortens the save on this disk), lz4 (smallest file) or none")
	asJSON := fs.Bool("json", false, "print one JSON object on stdout")
	live := fs.Bool("live", false, "copy pages while the guest runs, pausing it only for the last ones")
	maxPause := fs.Duration("max-pause", checkpoint.DefaultMaxPause, "with --live: the pause to aim for")
	noPredict := fs.Bool("no-predict", false, "with --live: copy pages that keep changing every round, not only in the last")
	var squeeze squeezeFlag
	fs.Var(&squeeze, "squeeze", "before the save, inflate the balloon so the guest gives up its page cache, and put it back after: --squeeze (auto) or --squeeze=SIZE (memory to take, e.g. 512M)")
	parent := fs.String("parent", "", "save only what changed since this checkpoint (an incremental checkpoint; its parents are looked for beside it)")
	keyFile := keyFlag(fs)
	if _, err := e.parse(fs, verbose, args); err != nil {
		return err
	}
	target, err := tf.target()
	if err != nil {
		return err
	}
	if err := required("o", *out); err != nil {
		return err
	}
	if *keepPaused && *quit {
		return usagef("--keep-paused and --quit exclude each other")
	}
	if !*live && (*noPredict || *maxPause != checkpoint.DefaultMaxPause) {
		return usagef("--max-pause and --no-predict go with --live")
	}
	if *maxPause <= 0 {
		return usagef("--max-pause must be positive, not %v", *maxPause)
	}
	if squeeze != "" {
		if _, _, err := checkpoint.ParseSqueeze(string(squeeze)); err != nil {
			return usagef("--squeeze: %v", err)
		}
	}
	if *parent != "" && *keyFile != "" {
		return usagef("--parent and --encrypt-key exclude each other: an incremental checkpoint is not encrypted")
	}
	if *compress != "auto" && *compress != "lz4" && *compress != "none" {
		return usagef("--compress must be auto, lz4 or none, not %q", *compress)
	}
	key, err := loadKey(*keyFile)
	if err != nil {
		return err
	}
	after := checkpoint.AfterPriorState
	switch {
	case *keepPaused:
		after = checkpoint.AfterKeepPaused
	case *quit:
		after = checkpoint.AfterQuit
	}
	bar := newProgress(e.stderr, "saving")
	res, err := checkpoint.Save(ctx, checkpoint.SaveOptions{
		Squeeze:     string(squeeze),
		Parent:      *parent,
		ScanOptions: checkpoint.ScanOptions{QMP: target.QMP, Domain: target.Domain, Connect: target.Connect, Profile: *profile, RequireIntrospection: *requireIntro, Log: e.log},
		Output:      *out,
		After:       after,
		Compression: writer.Compression(*compress),
		Key:         key,
		Progress:    bar.update,
		Live:        *live,
		MaxPause:    *maxPause,
		NoPredict:   *noPredict,
	})
	bar.done()
	if err != nil {
		return err
	}
	if *asJSON {
		return e.printJSON(res)
	}
	ballooned := ""
	if res.PagesOffline > 0 {
		ballooned = fmt.Sprintf(", %d ballooned", res.PagesOffline)
	}
	fmt.Fprintf(e.stdout, "saved %s: %d of %d pages (%d free%s, %d zero, %d hole), %s written, device state %s\n",
		res.Output, res.PagesSaved, res.PagesTotal, res.PagesFree, ballooned, res.PagesZero, res.PagesHole,
		mib(res.BytesWritten), mib(res.DeviceStateBytes))
	fmt.Fprintf(e.stdout, "guest paused %d ms (scan %d, pages %d, device state %d, sync %d), total %d ms; guest is %s\n",
		res.PauseMS, res.ScanMS, res.PagesMS, res.DeviceStateMS, res.SyncMS, res.DurationMS, res.GuestState)
	if p := res.Parent; p != nil {
		fmt.Fprintf(e.stdout, "incremental: %d of %d pages in use changed since %s (%d links below, depth %d); its hashes read in %d ms, the guest's hashed in %d ms\n",
			p.PagesChanged, p.PagesInUse, p.Path, p.Links, p.Depth, p.ParentMS, p.HashMS)
	}
	if sq := res.Squeeze; sq != nil {
		fmt.Fprintf(e.stdout, "squeeze: the balloon took %s of %s asked in %d ms before the save, and was put back\n",
			mib(int64(sq.Taken)), mib(int64(sq.Requested)), sq.InflateMS)
	}
	if l := res.Live; l != nil {
		fmt.Fprintf(e.stdout, "live: %d pre-copy rounds in %d ms (%s), %d pages deferred as hot, %d pages in the final round (%d ms)\n",
			l.Rounds, l.RoundsMS, l.StopReason, l.PagesDeferredHot, l.FinalDirtyPages, l.FinalMS)
	}
	for _, w := range res.Warnings {
		fmt.Fprintf(e.stderr, "warning: %s\n", term.EscapeText(w))
	}
	return nil
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

// pathsFlag is a flag that may be given more than once, each time a path.
type pathsFlag []string

func (f *pathsFlag) String() string { return strings.Join(*f, ",") }

func (f *pathsFlag) Set(v string) error {
	*f = append(*f, v)
	return nil
}

// parentsFlag adds --parent, repeatable, to a command that reads a chain.
func parentsFlag(fs *flag.FlagSet) *pathsFlag {
	var p pathsFlag
	fs.Var(&p, "parent", "a parent checkpoint of the chain that is not beside its child under the name the child gives (repeatable)")
	return &p
}

// squeezeFlag is --squeeze: alone it means auto, --squeeze=SIZE a size.
type squeezeFlag string

func (f *squeezeFlag) String() string { return string(*f) }

func (f *squeezeFlag) Set(v string) error {
	switch v {
	case "true":
		*f = "auto"
	case "false":
		*f = ""
	default:
		*f = squeezeFlag(v)
	}
	return nil
}

func (f *squeezeFlag) IsBoolFlag() bool { return true }
