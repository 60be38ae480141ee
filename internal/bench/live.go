package main

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"time"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
)

// The live bench (-live) measures saves of a guest that keeps writing
// memory: the workload's page writer (kw.wset, kw.rate) writes a working
// set of liveWSetMiB at each of liveRates MiB/s in turn (0: no writer, an
// idle guest), each rate on a guest of its own, booted like the default
// bench guest. On each it runs, side by side, kvmckpt's stop-and-copy
// save, `kvmckpt save --live` with and without prediction, QEMU's own live
// migration into a file (default downtime limit, bandwidth unlimited as
// for QEMU's save), and the disk alone writing the stop-and-copy file's
// bytes durably. The checks of the live-checkpoint issue are printed
// after the tables.
var (
	liveRates      = []int{0, 10, 50, 200}
	liveSmokeRates = []int{50}
)

const liveWSetMiB = 128

// Live bench tools.
const (
	liveStop      = "kvmckpt save (stop-and-copy)"
	livePredict   = "kvmckpt save --live"
	liveNoPredict = "kvmckpt save --live --no-predict"
	liveQEMU      = "QEMU live migration"
	liveDisk      = "disk alone (O_DIRECT, the stop-and-copy file's bytes)"
)

// liveRow is one save of a live point.
type liveRow struct {
	Tool    string  `json:"tool"`
	Rep     int     `json:"rep"`
	PauseMS float64 `json:"pause_ms"`
	TotalMS float64 `json:"total_ms"`
	// Written is what the tool wrote, rewrites included; Allocated the
	// result's size on disk.
	Written   int64 `json:"written_bytes"`
	Allocated int64 `json:"allocated_bytes"`
	// Rounds are kvmckpt's rounds or QEMU's dirty-bitmap syncs.
	Rounds        int64  `json:"rounds,omitempty"`
	StopReason    string `json:"stop_reason,omitempty"`
	DeferredPages uint64 `json:"deferred_pages,omitempty"`
	FinalPages    uint64 `json:"final_pages,omitempty"`
	// PausePhases are kvmckpt's own figures for its pause: the paused
	// guest's free-list walk, the final round's pages, the device state
	// and the commit, ms.
	PausePhases *pausePhases `json:"pause_phases,omitempty"`
	ToolCPUMS   float64      `json:"tool_cpu_ms"`
	QEMUCPUMS   float64      `json:"qemu_cpu_ms"`
	Failure     string       `json:"failure,omitempty"`
}

// livePoint is one writer rate.
type livePoint struct {
	RateMiBps int      `json:"rate_mib_s"`
	Workload  workload `json:"workload"`
	// MeasuredMiBps is the rate the guest's writer achieved over the
	// measurements (its pages written per second, 0 when idle).
	MeasuredMiBps float64   `json:"measured_rate_mib_s"`
	Rows          []liveRow `json:"rows"`
	Failures      []string  `json:"failures,omitempty"`
}

var writerGenRE = regexp.MustCompile(`KW WRITER (OK gen=(\d+)|FAIL[^\n]*)`)

// live measures every rate. A failed point is recorded and the next one
// measured, unless ctx ended.
func (b *bench) live(ctx context.Context, r *report) error {
	rates := liveRates
	switch {
	case len(b.cfg.Rates) > 0:
		rates = b.cfg.Rates
	case b.cfg.Smoke:
		rates = liveSmokeRates
	}
	var failed []string
	for _, rate := range rates {
		p, err := b.livePoint(ctx, rate)
		if err != nil {
			p.Failures = append(p.Failures, err.Error())
			failed = append(failed, fmt.Sprintf("%d MiB/s: %v", rate, err))
			b.logf("live point failed: %v", err)
		}
		r.Live = append(r.Live, p)
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d live points failed: %v", len(failed), failed)
	}
	return nil
}

// writerGen waits for the guest's next page-writer report after offset
// from and returns its generation, when it was seen, and where it ends.
func writerGen(ctx context.Context, g *vmtest.Guest, from int) (gen uint64, at time.Time, end int, err error) {
	m, end, err := g.WaitSerial(ctx, writerGenRE, from, 2*time.Minute)
	if err != nil {
		return 0, time.Time{}, 0, err
	}
	at = time.Now()
	sub := writerGenRE.FindStringSubmatch(m)
	if sub[2] == "" {
		return 0, at, end, fmt.Errorf("the guest's page writer reports %s", m)
	}
	gen, err = strconv.ParseUint(sub[2], 10, 64)
	return gen, at, end, err
}

func (b *bench) livePoint(ctx context.Context, rate int) (*livePoint, error) {
	w := newWorkload(b.cfg, b.cfg.MemMiB, b.cfg.Churn)
	p := &livePoint{RateMiBps: rate, Workload: w}
	cfg := w.guest()
	if rate > 0 {
		cfg.Workload.WSet, cfg.Workload.Rate = liveWSetMiB, rate
	}
	b.logf("live: boot %d MiB guest, writer %d MiB/s over %d MiB", w.MemMiB, rate, liveWSetMiB)
	g, err := bootReady(ctx, cfg, w.MemMiB)
	if err != nil {
		return p, err
	}
	defer g.Close()
	if _, err := runProc(ctx, opTimeout(w.MemMiB), nil, b.kvmckpt, "scan", "--qmp", g.QMPPath, "--json"); err != nil {
		return p, fmt.Errorf("warm-up scan: %w", err)
	}
	var gen0 uint64
	var t0 time.Time
	if rate > 0 {
		if gen0, t0, _, err = writerGen(ctx, g, 0); err != nil {
			return p, err
		}
	}
	dir, err := os.MkdirTemp(b.work, fmt.Sprintf("live%d-", rate))
	if err != nil {
		return p, err
	}
	defer os.RemoveAll(dir)
	tools := []string{liveStop, livePredict, liveNoPredict, liveQEMU}
	for rep := range b.cfg.Reps {
		for i := range tools {
			tool := tools[(i+rep)%len(tools)]
			// The guest settles between saves: a save just after
			// another would meet the first's dirty page cache.
			if err := syncfs(b.work); err != nil {
				return p, err
			}
			time.Sleep(2 * time.Second)
			row, err := b.liveSave(ctx, g, w, tool, dir)
			row.Rep = rep
			if err != nil {
				row.Failure = err.Error()
				p.Failures = append(p.Failures, fmt.Sprintf("%s: %v", tool, err))
			}
			p.Rows = append(p.Rows, row)
			b.logf("live %d MiB/s %s: paused %.0f ms (%s), wrote %.0f MiB in %.0f ms", rate, tool, row.PauseMS, row.PausePhases, mib(row.Written), row.TotalMS)
		}
		if stop, ok := liveRowOf(p, liveStop, rep); ok {
			d, err := diskBandwidth(dir, stop.Allocated, diskDirect)
			if err != nil {
				return p, err
			}
			p.Rows = append(p.Rows, liveRow{Tool: liveDisk, Rep: rep, PauseMS: d.MS, TotalMS: d.MS, Written: d.Bytes, Allocated: d.Bytes})
		}
	}
	if rate > 0 {
		gen1, t1, _, err := writerGen(ctx, g, len(g.Serial()))
		if err != nil {
			return p, err
		}
		p.MeasuredMiBps = float64(gen1-gen0) * 4096 / (1 << 20) / t1.Sub(t0).Seconds()
	}
	if bad := kernelTrouble.FindString(g.Serial()); bad != "" {
		p.Failures = append(p.Failures, "source guest's console shows trouble: "+bad)
	}
	if len(p.Failures) > 0 {
		return p, fmt.Errorf("%d failures, the first: %s", len(p.Failures), p.Failures[0])
	}
	return p, nil
}

// liveRowOf finds the row of tool in repetition rep.
func liveRowOf(p *livePoint, tool string, rep int) (liveRow, bool) {
	for _, r := range p.Rows {
		if r.Tool == tool && r.Rep == rep && r.Failure == "" {
			return r, true
		}
	}
	return liveRow{}, false
}

// kvmckptSaveJSON is the part of `kvmckpt save --json` the live bench
// reads.
type kvmckptSaveJSON struct {
	pausePhases
	PauseMS          float64 `json:"pause_ms"`
	BytesWritten     int64   `json:"bytes_written"`
	DeviceStateBytes int64   `json:"device_state_bytes"`
	Live             *struct {
		Rounds           int64   `json:"rounds"`
		BytesPerRound    []int64 `json:"bytes_per_round"`
		PagesDeferredHot uint64  `json:"pages_deferred_hot"`
		FinalDirtyPages  uint64  `json:"final_dirty_pages"`
		StopReason       string  `json:"stop_reason"`
	} `json:"live"`
}

// pausePhases are the phases of `kvmckpt save --json`'s pause.
type pausePhases struct {
	ScanMS        int64 `json:"scan_ms"`
	PagesMS       int64 `json:"pages_ms"`
	DeviceStateMS int64 `json:"device_state_ms"`
	SyncMS        int64 `json:"sync_ms"`
}

// String is the phases for a table cell, "–" for a tool without them.
func (p *pausePhases) String() string {
	if p == nil {
		return "–"
	}
	return fmt.Sprintf("%d / %d / %d / %d", p.ScanMS, p.PagesMS, p.DeviceStateMS, p.SyncMS)
}

// liveSave runs one save of the running guest into dir, and removes its
// file.
func (b *bench) liveSave(ctx context.Context, g *vmtest.Guest, w workload, tool, dir string) (liveRow, error) {
	row := liveRow{Tool: tool}
	cpu0, err := readProcTimes(g.PID)
	if err != nil {
		return row, err
	}
	timeout := opTimeout(w.MemMiB)
	var pr procResult
	var files []string
	defer func() {
		for _, f := range files {
			os.Remove(f)
		}
	}()
	switch tool {
	case liveQEMU:
		out := filepath.Join(dir, "qemu.live")
		files = []string{out}
		var cr childResult
		if pr, err = b.child(ctx, childSpec{Mode: modeQEMULive, QMP: g.QMPPath, Output: out, Timeout: timeout, Copier: b.cfg.Copier}, &cr); err != nil {
			return row, err
		}
		row.PauseMS, row.Written, row.Rounds = cr.PauseMS, cr.StreamBytes, cr.Iterations
	default:
		out := filepath.Join(dir, "guest.kvmckpt")
		files = []string{out}
		args := []string{"save", "--qmp", g.QMPPath, "-o", out, "--json"}
		switch tool {
		case livePredict:
			args = append(args, "--live")
		case liveNoPredict:
			args = append(args, "--live", "--no-predict")
		}
		if pr, err = runProc(ctx, timeout, nil, append([]string{b.kvmckpt}, args...)...); err != nil {
			return row, err
		}
		var js kvmckptSaveJSON
		if err := json.Unmarshal(pr.Stdout, &js); err != nil {
			return row, fmt.Errorf("decode kvmckpt save output: %w", err)
		}
		row.PauseMS, row.Written = js.PauseMS, js.BytesWritten
		row.PausePhases = &js.pausePhases
		if l := js.Live; l != nil {
			// Every byte the rounds wrote, rewrites included, and
			// the device state; not the index and header.
			row.Written = js.DeviceStateBytes
			for _, n := range l.BytesPerRound {
				row.Written += n
			}
			row.Rounds, row.StopReason, row.DeferredPages, row.FinalPages = l.Rounds, l.StopReason, l.PagesDeferredHot, l.FinalDirtyPages
		}
		if _, err := runProc(ctx, timeout, nil, b.kvmckpt, "verify", out); err != nil {
			return row, fmt.Errorf("verify the checkpoint: %w", err)
		}
	}
	cpu1, err := readProcTimes(g.PID)
	if err != nil {
		return row, err
	}
	row.TotalMS, row.ToolCPUMS, row.QEMUCPUMS = ms(pr.Wall), ms(pr.CPU), ms(cpu1.Total()-cpu0.Total())
	size, err := sizeOf(files...)
	if err != nil {
		return row, err
	}
	row.Allocated = size.Allocated
	if running, state, err := isRunning(ctx, g.QMPPath); err != nil || !running {
		return row, fmt.Errorf("guest not running after the save (%s): %v", state, err)
	}
	return row, nil
}

// writeLive prints the live points' tables and the checks.
func writeLive(w io.Writer, points []*livePoint) {
	fmt.Fprintf(w, "\n## Live saves: the guest writes memory while it is saved\n\n")
	fmt.Fprintf(w, "Each writer rate on a guest of its own; medians over the repetitions. "+
		"Written: what the tool wrote, rewrites included (for QEMU its stream). Rounds: kvmckpt's pre-copy rounds, or QEMU's dirty-bitmap syncs.\n")
	for _, p := range points {
		title := "idle guest (no writer)"
		if p.RateMiBps > 0 {
			title = fmt.Sprintf("writer at %d MiB/s over %d MiB (measured %.1f MiB/s)", p.RateMiBps, liveWSetMiB, p.MeasuredMiBps)
		}
		fmt.Fprintf(w, "\n### %d MiB guest, %s\n\n", p.Workload.MemMiB, title)
		fmt.Fprintf(w, "| tool | guest paused ms | pause: walk / pages / device state / commit ms | total ms | written MiB | file MiB (allocated) | rounds | stop reason | deferred pages | final-round pages | tool CPU ms | QEMU CPU ms | pause vs stop-and-copy | written vs stop-and-copy file |\n")
		fmt.Fprintf(w, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		stop := liveMedian(p, liveStop)
		for _, tool := range []string{liveStop, livePredict, liveNoPredict, liveQEMU, liveDisk} {
			m := liveMedian(p, tool)
			if m.n == 0 {
				continue
			}
			fmt.Fprintf(w, "| %s | %.0f | %s | %.0f | %.1f | %.1f | %s | %s | %s | %s | %.0f | %.0f | %s | %s |\n",
				tool, m.PauseMS, m.PausePhases, m.TotalMS, mib(m.Written), mib(m.Allocated), intCell(m.Rounds), m.StopReason,
				intCell(int64(m.DeferredPages)), intCell(int64(m.FinalPages)), m.ToolCPUMS, m.QEMUCPUMS,
				times(ratio(m.PauseMS, stop.PauseMS)), times(ratio(float64(m.Written), float64(stop.Allocated))))
		}
	}
	fmt.Fprintf(w, "\n### Targets (kvmckpt save --live, default 2 GiB guest)\n\n")
	for _, p := range points {
		l, s := liveMedian(p, livePredict), liveMedian(p, liveStop)
		if l.n == 0 || s.n == 0 {
			continue
		}
		switch p.RateMiBps {
		case 0:
			fmt.Fprintf(w, "- idle: pause %.0f ms, target at most 100 ms: **%s**\n", l.PauseMS, met(l.PauseMS <= 100))
		case 50:
			pr, br := ratio(l.PauseMS, s.PauseMS), ratio(float64(l.Written), float64(s.Allocated))
			fmt.Fprintf(w, "- 50 MiB/s: pause %.0f ms, %.2fx the stop-and-copy pause (%.0f ms), target at most 0.2x: **%s**\n", l.PauseMS, pr, s.PauseMS, met(pr <= 0.2))
			fmt.Fprintf(w, "- 50 MiB/s: wrote %.1f MiB, %.2fx the stop-and-copy file (%.1f MiB), target at most 1.2x: **%s**\n", mib(l.Written), br, mib(s.Allocated), met(br <= 1.2))
		}
	}
}

func met(ok bool) string {
	if ok {
		return "met"
	}
	return "missed"
}

func intCell(n int64) string {
	if n == 0 {
		return "–"
	}
	return strconv.FormatInt(n, 10)
}

// liveMedianRow is a tool's median row, n the repetitions behind it.
type liveMedianRow struct {
	liveRow
	n int
}

// liveMedian takes each number's median over tool's successful rows (the
// stop reason of the first).
// medianPauseRow is the row of the median pause (the lower middle one of
// an even count), whose phases the tables show beside it.
func medianPauseRow(rows []liveRow) liveRow {
	s := slices.Clone(rows)
	slices.SortFunc(s, func(a, b liveRow) int { return cmp.Compare(a.PauseMS, b.PauseMS) })
	return s[(len(s)-1)/2]
}

func liveMedian(p *livePoint, tool string) liveMedianRow {
	var rows []liveRow
	for _, r := range p.Rows {
		if r.Tool == tool && r.Failure == "" {
			rows = append(rows, r)
		}
	}
	if len(rows) == 0 {
		return liveMedianRow{}
	}
	med := func(f func(liveRow) float64) float64 {
		v := make([]float64, len(rows))
		for i, r := range rows {
			v[i] = f(r)
		}
		return summarize(v).Median
	}
	return liveMedianRow{n: len(rows), liveRow: liveRow{
		Tool:          tool,
		PauseMS:       med(func(r liveRow) float64 { return r.PauseMS }),
		TotalMS:       med(func(r liveRow) float64 { return r.TotalMS }),
		Written:       int64(med(func(r liveRow) float64 { return float64(r.Written) })),
		Allocated:     int64(med(func(r liveRow) float64 { return float64(r.Allocated) })),
		Rounds:        int64(med(func(r liveRow) float64 { return float64(r.Rounds) })),
		StopReason:    rows[0].StopReason,
		DeferredPages: uint64(med(func(r liveRow) float64 { return float64(r.DeferredPages) })),
		FinalPages:    uint64(med(func(r liveRow) float64 { return float64(r.FinalPages) })),
		ToolCPUMS:     med(func(r liveRow) float64 { return r.ToolCPUMS }),
		QEMUCPUMS:     med(func(r liveRow) float64 { return r.QEMUCPUMS }),
		PausePhases:   medianPauseRow(rows).PausePhases,
	}}
}
