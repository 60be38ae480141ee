package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
)

// The incremental bench (-incremental): a guest holding half its RAM of
// incompressible data, quiet (the workload's truth mode), of which a
// known share of the pages in use is rewritten, from the host, between a
// whole save and an incremental one (save --parent); then a whole save of
// the same memory, for the pause to compare with. The pages rewritten are
// the workload's own data pages, found through the frames it prints, so
// the guest's kernel is not disturbed; the kernel's own changes in the
// meantime come on top.

// incrementalShares are the shares of the pages in use rewritten.
var incrementalShares = []float64{0.01, 0.10, 0.50}

// incrementalRow is one share's measurement.
type incrementalRow struct {
	Share float64 `json:"share"`
	Rep   int     `json:"rep"`
	// InUse are the pages the whole save stored; Rewritten those the
	// bench changed.
	InUse     uint64 `json:"pages_in_use"`
	Rewritten uint64 `json:"pages_rewritten"`
	// The incremental save: pages stored, file size, pause, and its
	// hashing of the guest's pages (in the pause) and reading of the
	// parent's hashes (before it).
	DeltaPages   uint64  `json:"delta_pages"`
	DeltaBytes   int64   `json:"delta_bytes"`
	DeltaPauseMS float64 `json:"delta_pause_ms"`
	DeltaTotalMS float64 `json:"delta_total_ms"`
	HashMS       float64 `json:"hash_ms"`
	ParentMS     float64 `json:"parent_ms"`
	// Where each pause went: scan, pages, device state, sync.
	Delta pauseParts `json:"delta_parts"`
	Full  pauseParts `json:"full_parts"`
	// The whole save of the same memory.
	FullBytes   int64   `json:"full_bytes"`
	FullPauseMS float64 `json:"full_pause_ms"`
	FullTotalMS float64 `json:"full_total_ms"`
	Failure     string  `json:"failure,omitempty"`
}

// incrementalResult is the incremental bench's result.
type incrementalResult struct {
	MemMiB, DataMiB int
	Rows            []incrementalRow
}

func (b *bench) incremental(ctx context.Context, r *report) error {
	mem := b.cfg.MemMiB
	res := &incrementalResult{MemMiB: mem, DataMiB: mem / 2}
	r.Incremental = res
	cfg := vmtest.Config{MemMiB: mem, Machine: b.cfg.Machine, CPUs: b.cfg.CPUs, QEMU: b.cfg.QEMU,
		Workload: vmtest.Workload{Anon: res.DataMiB, Text: mem / 32, Truth: true},
		// The data stays in the frames the workload printed: no
		// khugepaged collapsing it into huge pages elsewhere.
		Append: []string{"transparent_hugepage=never"}}
	g, err := vmtest.Start(ctx, cfg)
	if err != nil {
		return fmt.Errorf("boot guest: %w", err)
	}
	defer g.Close()
	// After its second snapshot of its pages, the workload is quiet:
	// the changes between two saves are then the bench's and the
	// kernel's own.
	if _, _, err := g.WaitSerial(ctx, truth2EndRE, 0, bootTimeout(mem)+5*time.Minute); err != nil {
		return fmt.Errorf("boot guest: %v", err)
	}
	truth, err := vmtest.ParseTruth(g.Serial())
	if err != nil {
		return err
	}
	var frames []uint64
	for _, runs := range truth.Frames {
		for _, run := range runs {
			for p := run.Start; p < run.Start+run.Count; p++ {
				frames = append(frames, p)
			}
		}
	}
	rand.New(rand.NewPCG(1, 2)).Shuffle(len(frames), func(i, j int) { frames[i], frames[j] = frames[j], frames[i] })
	dir, err := os.MkdirTemp(b.work, "incremental-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	ram, err := os.OpenFile(g.RAMPath, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer ram.Close()
	rng := rand.New(rand.NewPCG(3, 4))
	for rep := range b.cfg.Reps {
		for _, share := range incrementalShares {
			row := incrementalRow{Share: share, Rep: rep}
			err := b.incrementalPoint(ctx, g, ram, frames, rng, dir, &row)
			if err != nil {
				row.Failure = err.Error()
			}
			res.Rows = append(res.Rows, row)
			b.logf("incremental %.0f%%: %d of %d pages rewritten; delta %d pages, %.1f MiB, paused %.0f ms (hash %.0f ms); whole %.1f MiB, paused %.0f ms",
				100*share, row.Rewritten, row.InUse, row.DeltaPages, mib(row.DeltaBytes), row.DeltaPauseMS, row.HashMS, mib(row.FullBytes), row.FullPauseMS)
			if err != nil {
				return err
			}
		}
	}
	return nil
}

var truth2EndRE = regexp.MustCompile(`KW TRUTH2 END`)

// incrementalPoint saves the guest whole (the parent), rewrites share of
// the pages it stored, saves it incrementally and whole again.
func (b *bench) incrementalPoint(ctx context.Context, g *vmtest.Guest, ram *os.File, frames []uint64, rng *rand.Rand, dir string, row *incrementalRow) error {
	parent := filepath.Join(dir, "parent.kvmckpt")
	js, _, err := b.kvmckptSave(ctx, g, parent, "")
	if err != nil {
		return err
	}
	row.InUse = js.PagesSaved
	n := uint64(row.Share * float64(row.InUse))
	if n > uint64(len(frames)) {
		return fmt.Errorf("%d pages to rewrite, the workload's data has %d", n, len(frames))
	}
	// Rewrite them while the guest is paused: its memory changes under
	// it, which is what a run would do, only counted.
	if err := setRunning(ctx, g.QMPPath, false); err != nil {
		return err
	}
	var buf [16]byte
	for _, pfn := range frames[:n] {
		for i := range buf {
			buf[i] = byte(rng.Uint32())
		}
		// The pc machine's RAM below 3.5 GiB: guest-physical address =
		// offset in the RAM file.
		if _, err := ram.WriteAt(buf[:], int64(pfn)*4096+int64(rng.IntN(4096-len(buf)))); err != nil {
			setRunning(ctx, g.QMPPath, true)
			return err
		}
	}
	if err := setRunning(ctx, g.QMPPath, true); err != nil {
		return err
	}
	row.Rewritten = n
	delta := filepath.Join(dir, "delta.kvmckpt")
	djs, dwall, err := b.kvmckptSave(ctx, g, delta, parent)
	if err != nil {
		return err
	}
	row.DeltaPages, row.DeltaPauseMS, row.DeltaTotalMS, row.Delta = djs.PagesSaved, djs.PauseMS, dwall, djs.pauseParts
	if djs.Parent != nil {
		row.HashMS, row.ParentMS = djs.Parent.HashMS, djs.Parent.ParentMS
	}
	if row.DeltaBytes, err = fileBytes(delta); err != nil {
		return err
	}
	full := filepath.Join(dir, "full.kvmckpt")
	fjs, fwall, err := b.kvmckptSave(ctx, g, full, "")
	if err != nil {
		return err
	}
	row.FullPauseMS, row.FullTotalMS, row.Full = fjs.PauseMS, fwall, fjs.pauseParts
	if row.FullBytes, err = fileBytes(full); err != nil {
		return err
	}
	for _, f := range []string{parent, delta, full} {
		os.Remove(f)
	}
	return nil
}

// pauseParts are the parts of a save's pause, ms.
type pauseParts struct {
	ScanMS   float64 `json:"scan_ms"`
	PagesMS  float64 `json:"pages_ms"`
	DeviceMS float64 `json:"device_state_ms"`
	SyncMS   float64 `json:"sync_ms"`
}

func (p pauseParts) String() string {
	return fmt.Sprintf("%.0f/%.0f/%.0f/%.0f", p.ScanMS, p.PagesMS, p.DeviceMS, p.SyncMS)
}

// saveJSON is what the bench reads of `kvmckpt save --json`.
type saveJSON struct {
	pauseParts
	PagesSaved uint64  `json:"pages_saved"`
	PauseMS    float64 `json:"pause_ms"`
	Parent     *struct {
		HashMS   float64 `json:"hash_ms"`
		ParentMS float64 `json:"parent_ms"`
	} `json:"parent"`
}

// kvmckptSave runs `kvmckpt save` of g into out, with --parent if parent
// is not empty, after a sync and a moment for the disk to settle.
func (b *bench) kvmckptSave(ctx context.Context, g *vmtest.Guest, out, parent string) (saveJSON, float64, error) {
	var js saveJSON
	if err := syncfs(b.work); err != nil {
		return js, 0, err
	}
	time.Sleep(time.Second)
	args := []string{b.kvmckpt, "save", "--qmp", g.QMPPath, "-o", out, "--json"}
	if parent != "" {
		args = append(args, "--parent", parent)
	}
	pr, err := runProc(ctx, opTimeout(b.cfg.MemMiB)+5*time.Minute, nil, args...)
	if err != nil {
		return js, 0, err
	}
	if err := json.Unmarshal(pr.Stdout, &js); err != nil {
		return js, 0, fmt.Errorf("decode kvmckpt save output: %w", err)
	}
	return js, ms(pr.Wall), nil
}

func fileBytes(path string) (int64, error) {
	st, err := os.Stat(path)
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// writeIncremental prints the incremental bench's table and the issue's
// targets.
func writeIncremental(w io.Writer, s *incrementalResult) {
	fmt.Fprintf(w, "\n## Incremental saves: a %d MiB guest holding %d MiB of incompressible data, a share of its pages in use rewritten\n\n", s.MemMiB, s.DataMiB)
	fmt.Fprintf(w, "Pages changed: those the bench rewrote and those the guest's kernel changed meanwhile (the workload is quiet); the delta stores exactly the pages whose content differs from the parent's, so \"delta pages\" is that count. Pause parts: scan/pages/device state/sync, ms; hashing the guest's pages is in the delta's pause too, reading the parent's hashes before it.\n\n")
	fmt.Fprintf(w, "| rewritten | rep | pages in use | pages rewritten | delta pages (changed) | file / changed bytes | delta MiB | delta pause ms | parts | hash ms | parent hashes ms (before) | whole MiB | whole pause ms | parts | pause ratio |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range s.Rows {
		if r.Failure != "" {
			fmt.Fprintf(w, "| %.0f%% | %d | failed: %s |||||||||||||\n", 100*r.Share, r.Rep, r.Failure)
			continue
		}
		fmt.Fprintf(w, "| %.0f%% | %d | %d | %d | %d | %.3f | %.1f | %.0f | %s | %.0f | %.0f | %.1f | %.0f | %s | %.2f |\n",
			100*r.Share, r.Rep, r.InUse, r.Rewritten, r.DeltaPages, float64(r.DeltaBytes)/float64(max(r.DeltaPages, 1)*4096),
			mib(r.DeltaBytes), r.DeltaPauseMS, r.Delta, r.HashMS, r.ParentMS, mib(r.FullBytes), r.FullPauseMS, r.Full, r.DeltaPauseMS/max(r.FullPauseMS, 1))
	}
	worstSize, worstPause := 0.0, 0.0
	for _, r := range s.Rows {
		if r.Failure != "" || r.DeltaPages == 0 {
			continue
		}
		worstSize = max(worstSize, float64(r.DeltaBytes)/float64(r.DeltaPages*4096))
		if r.Share == 0.10 {
			worstPause = max(worstPause, r.DeltaPauseMS/max(r.FullPauseMS, 1))
		}
	}
	fmt.Fprintf(w, "\nTarget: a delta file is at most 1.1x the pages changed and in use (incompressible here, so before compression too): worst %.3fx (%s).\n", worstSize, met(worstSize <= 1.1))
	fmt.Fprintf(w, "Target: with 10%% changed, a delta save pauses the guest at most 0.3x as long as a whole save: worst %.2fx (%s).\n", worstPause, met(worstPause <= 0.3))
}
