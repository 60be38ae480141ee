package main

import (
	"context"
	"fmt"
	"text/tabwriter"

	"github.com/kvmckpt/kvmckpt/checkpoint"
	"github.com/kvmckpt/kvmckpt/internal/term"
)

func cmdScan(ctx context.Context, e *env, args []string) error {
	fs, verbose := e.flags("scan")
	tf := targetFlags(fs)
	asJSON := fs.Bool("json", false, "print one JSON object on stdout")
	profile := fs.String("profile", "auto", "kernel profile: auto, or a profile file")
	requireIntro := fs.Bool("require-introspection", false, "fail rather than save every non-zero page when the guest kernel cannot be read")
	mapPNG := fs.String("map", "", "draw guest memory into this PNG file")
	if _, err := e.parse(fs, verbose, args); err != nil {
		return err
	}
	target, err := tf.target()
	if err != nil {
		return err
	}
	st, err := checkpoint.Scan(ctx, checkpoint.ScanOptions{QMP: target.QMP, Domain: target.Domain, Connect: target.Connect, Profile: *profile, RequireIntrospection: *requireIntro, Map: *mapPNG, Log: e.log})
	if err != nil {
		return err
	}
	if *asJSON {
		return e.printJSON(st)
	}
	pct := func(n uint64) string { return fmt.Sprintf("%5.1f%%", 100*float64(n)/float64(max(st.PagesTotal, 1))) }
	tw := tabwriter.NewWriter(e.stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	if st.FullSave {
		fmt.Fprintf(e.stdout, "kernel:  not introspected: every non-zero page would be saved (see the warning)\n")
	} else {
		fmt.Fprintf(e.stdout, "kernel:  %s\nprofile: %s\n", term.Escape(st.Banner), term.Escape(st.Profile))
	}
	fmt.Fprintf(tw, "\tpages\tMiB\tshare\t\n")
	for _, r := range []struct {
		name string
		n    uint64
	}{
		{"total", st.PagesTotal}, {"to save", st.PagesUsed}, {"free", st.PagesFree},
		{"  buddy", st.FreeBuddy}, {"  per-CPU", st.FreePCP}, {"ballooned", st.PagesOffline}, {"zero", st.PagesZero}, {"hole", st.PagesHole},
	} {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t\n", r.name, r.n, r.n>>8, pct(r.n))
	}
	tw.Flush()
	fmt.Fprintf(e.stdout, "walk %d ms, guest paused %d ms, total %d ms\n", st.WalkMS, st.PauseMS, st.DurationMS)
	for _, w := range st.Warnings {
		fmt.Fprintf(e.stderr, "warning: %s\n", term.EscapeText(w))
	}
	if *mapPNG != "" {
		fmt.Fprintf(e.stdout, "map: %s\n", *mapPNG)
	}
	return nil
}
