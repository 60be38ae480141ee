package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
)

// The limit bench (-limit): the default bench guest saved by kvmckpt
// stop-and-copy, by this build and by an older one (-old), alternated,
// each save followed by the two physical limits of its pages phase
// measured right after it: the disk's O_DIRECT bandwidth for the same
// raw byte count, and the memory bandwidth of reading that many bytes of
// the guest's RAM file through a fresh mapping. Then each checkpoint is
// restored by the binary that wrote it into a new QEMU, which verifies
// its data.

const (
	binNew = "new"
	binOld = "old"
)

// limitRow is one save and its limits.
type limitRow struct {
	Binary string `json:"binary"`
	Rep    int    `json:"rep"`
	// From kvmckpt's --json.
	PauseMS      float64            `json:"pause_ms"`
	ScanMS       float64            `json:"scan_ms"`
	PagesMS      float64            `json:"pages_ms"`
	PagesSaved   float64            `json:"pages_saved"`
	BytesWritten float64            `json:"bytes_written"`
	Stages       map[string]float64 `json:"pages_stages,omitempty"`
	// The pages' raw bytes per second, and the limits measured after
	// the save, bytes/s.
	RawBps  float64 `json:"raw_bytes_per_s"`
	DiskBps float64 `json:"disk_bytes_per_s"`
	MemBps  float64 `json:"mem_bytes_per_s"`
	// Restore by the same binary.
	RestoreMS float64 `json:"restore_ms"`
	RestorePg float64 `json:"restore_pages_ms"`
	Verified  bool    `json:"verified"`
	Failure   string  `json:"failure,omitempty"`
}

// OfLimit is the pages' raw rate over the lower limit.
func (r limitRow) OfLimit() float64 { return r.RawBps / max(min(r.DiskBps, r.MemBps), 1) }

type limitResult struct {
	Workload workload   `json:"workload"`
	Old      string     `json:"old,omitempty"`
	Rows     []limitRow `json:"rows"`
}

func (b *bench) limit(ctx context.Context, r *report) error {
	w := newWorkload(b.cfg, b.cfg.MemMiB, b.cfg.Churn)
	res := &limitResult{Workload: w, Old: b.cfg.Old}
	r.Limit = res
	bins := map[string]string{binNew: b.kvmckpt}
	order := []string{binNew}
	if b.cfg.Old != "" {
		old, err := filepath.Abs(b.cfg.Old)
		if err != nil {
			return err
		}
		bins[binOld] = old
		order = []string{binOld, binNew}
	}
	b.logf("boot %d MiB guest: churn %d MiB, keep %d+%d MiB, text %d MiB", w.MemMiB, w.ChurnMiB, w.AnonMiB, w.TmpfsMiB, w.TextMiB)
	g, err := bootReady(ctx, w.guest(), w.MemMiB)
	if err != nil {
		return err
	}
	defer g.Close()
	for _, bin := range order {
		if _, err := runProc(ctx, opTimeout(w.MemMiB), nil, bins[bin], "scan", "--qmp", g.QMPPath, "--json"); err != nil {
			return fmt.Errorf("warm-up scan (%s): %w", bin, err)
		}
	}
	dir, err := os.MkdirTemp(b.work, "limit-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	for rep := range b.cfg.Reps {
		o := slices.Clone(order)
		if rep%2 == 1 {
			slices.Reverse(o)
		}
		for _, bin := range o {
			row := limitRow{Binary: bin, Rep: rep}
			err := b.limitSave(ctx, g, w, bins[bin], filepath.Join(dir, bin+".kvmckpt"), &row)
			if err != nil {
				row.Failure = err.Error()
			}
			res.Rows = append(res.Rows, row)
			b.logf("rep %d: %s: pause %.0f ms, pages %.0f ms, %.0f MB/s raw; disk %.0f MB/s, memory %.0f MB/s: %.0f%% of the lower; restore %.0f ms, verified %v",
				rep+1, bin, row.PauseMS, row.PagesMS, row.RawBps/1e6, row.DiskBps/1e6, row.MemBps/1e6, 100*row.OfLimit(), row.RestoreMS, row.Verified)
			if err != nil {
				return err
			}
		}
	}
	return nil
}

func (b *bench) limitSave(ctx context.Context, g *vmtest.Guest, w workload, bin, out string, row *limitRow) error {
	if err := b.settle(ctx, g, w); err != nil {
		return err
	}
	pr, err := runProc(ctx, opTimeout(w.MemMiB), nil, bin, "save", "--qmp", g.QMPPath, "-o", out, "--json")
	if err != nil {
		return err
	}
	var js struct {
		PauseMS      float64            `json:"pause_ms"`
		ScanMS       float64            `json:"scan_ms"`
		PagesMS      float64            `json:"pages_ms"`
		PagesSaved   float64            `json:"pages_saved"`
		BytesWritten float64            `json:"bytes_written"`
		Stages       map[string]float64 `json:"pages_stages"`
	}
	if err := json.Unmarshal(pr.Stdout, &js); err != nil {
		return fmt.Errorf("decode save output: %w", err)
	}
	row.PauseMS, row.ScanMS, row.PagesMS, row.PagesSaved, row.BytesWritten, row.Stages = js.PauseMS, js.ScanMS, js.PagesMS, js.PagesSaved, js.BytesWritten, js.Stages
	raw := int64(js.PagesSaved) * 4096
	row.RawBps = float64(raw) / (js.PagesMS / 1000)
	if err := b.settle(ctx, g, w); err != nil {
		return err
	}
	n := max((raw+(4<<20)-1)&^(4<<20-1), 16<<20)
	d, err := diskBandwidth(b.work, n, diskDirect)
	if err != nil {
		return err
	}
	row.DiskBps = float64(d.Bytes) / (d.MS / 1000)
	if row.MemBps, err = memoryBandwidth(g.RAMPath, raw); err != nil {
		return err
	}

	// Restore, by the same binary, into a new QEMU; the source paused
	// meanwhile, as in the default bench.
	if err := syncfs(b.work); err != nil {
		return err
	}
	if err := evict(out); err != nil {
		return err
	}
	by := *b // the same bench, restoring with bin
	by.kvmckpt = bin
	m, err := by.restorePaused(ctx, g, w, out)
	row.RestoreMS, row.RestorePg, row.Verified = m.TotalMS, m.Detail["pages_ms"], m.Verified
	return err
}

// memoryBandwidth reads n bytes of the RAM file at path through a fresh
// read-only mapping, with a goroutine per core copying 1 MiB at a time
// (the fastest way to read memory from Go), and returns bytes/s: the
// memory side of a save's limit, mapping the pages in included, as a
// save maps the RAM file afresh.
func memoryBandwidth(path string, n int64) (float64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	n = min(n, st.Size()) &^ (1<<20 - 1)
	mem, err := unix.Mmap(int(f.Fd()), 0, int(n), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return 0, err
	}
	defer unix.Munmap(mem)
	next := make(chan int64, 64)
	var wg sync.WaitGroup
	t := time.Now()
	for range runtime.GOMAXPROCS(0) {
		wg.Go(func() {
			buf := make([]byte, 1<<20)
			for off := range next {
				copy(buf, mem[off:off+1<<20])
			}
		})
	}
	for off := int64(0); off < n; off += 1 << 20 {
		next <- off
	}
	close(next)
	wg.Wait()
	return float64(n) / time.Since(t).Seconds(), nil
}

func writeLimit(w io.Writer, s *limitResult) {
	fmt.Fprintf(w, "\n## Stop-and-copy at the limit: the default guest (%d MiB, %d MiB freed, %d+%d MiB kept, %d MiB text), kvmckpt save, old and new alternated\n\n",
		s.Workload.MemMiB, s.Workload.ChurnMiB, s.Workload.AnonMiB, s.Workload.TmpfsMiB, s.Workload.TextMiB)
	if s.Old != "" {
		fmt.Fprintf(w, "old: %s\n\n", s.Old)
	}
	fmt.Fprintf(w, "Raw MB/s: the pages in use (4 KiB each) over pages_ms. Disk: O_DIRECT + fdatasync of the same raw byte count, right after the save. Memory: reading that many bytes of the RAM file through a fresh mapping, right after. Of limit: raw MB/s over the lower of the two.\n\n")
	fmt.Fprintf(w, "| binary | rep | pause ms | scan ms | pages ms | MiB written | raw MB/s | disk MB/s | memory MB/s | of limit | restore ms | verified |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n")
	for _, r := range s.Rows {
		if r.Failure != "" {
			fmt.Fprintf(w, "| %s | %d | failed: %s ||||||||||\n", r.Binary, r.Rep+1, r.Failure)
			continue
		}
		fmt.Fprintf(w, "| %s | %d | %.0f | %.0f | %.0f | %.1f | %.0f | %.0f | %.0f | %.0f%% | %.0f | %v |\n",
			r.Binary, r.Rep+1, r.PauseMS, r.ScanMS, r.PagesMS, r.BytesWritten/(1<<20), r.RawBps/1e6, r.DiskBps/1e6, r.MemBps/1e6, 100*r.OfLimit(), r.RestoreMS, r.Verified)
	}
	med := func(bin string, f func(limitRow) float64) float64 {
		var v []float64
		for _, r := range s.Rows {
			if r.Binary == bin && r.Failure == "" {
				v = append(v, f(r))
			}
		}
		return summarize(v).Median
	}
	pauseNew := med(binNew, func(r limitRow) float64 { return r.PauseMS })
	ofNew := med(binNew, limitRow.OfLimit)
	fmt.Fprintf(w, "\nMedians, new: pause %.0f ms, pages %.0f ms, %.0f%% of the limit.\n", pauseNew, med(binNew, func(r limitRow) float64 { return r.PagesMS }), 100*ofNew)
	fmt.Fprintf(w, "Target: the pages phase at 80%% or more of the lower limit: %.0f%% (%s).\n", 100*ofNew, met(ofNew >= 0.8))
	if s.Old != "" {
		pauseOld := med(binOld, func(r limitRow) float64 { return r.PauseMS })
		fmt.Fprintf(w, "Medians, old: pause %.0f ms, pages %.0f ms, %.0f%% of the limit.\n", pauseOld, med(binOld, func(r limitRow) float64 { return r.PagesMS }), 100*med(binOld, limitRow.OfLimit))
		fmt.Fprintf(w, "Target: the new pause at most 0.6x the old: %.2fx (%s).\n", pauseNew/max(pauseOld, 1), met(pauseNew <= 0.6*pauseOld))
	}
	var stages []map[string]float64
	for _, r := range s.Rows {
		if r.Binary == binNew && r.Stages != nil {
			stages = append(stages, r.Stages)
		}
	}
	if len(stages) > 0 {
		fmt.Fprintf(w, "\nWhere the new pages phase went (medians of its pages_stages; the workers' times are summed over the workers):\n\n| workers | read ms | hash ms | compress ms | checksum ms | workers idle ms | writer waits for chunks ms | writer waits for disk ms | disk busy ms | chunks LZ4 | raw | raw by choice |\n|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
		m := func(k string) float64 {
			var v []float64
			for _, s := range stages {
				v = append(v, s[k])
			}
			return summarize(v).Median
		}
		fmt.Fprintf(w, "| %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f |\n",
			m("workers"), m("read_ms"), m("hash_ms"), m("compress_ms"), m("checksum_ms"), m("idle_ms"), m("wait_chunk_ms"), m("wait_disk_ms"), m("disk_ms"), m("chunks_lz4"), m("chunks_raw"), m("chunks_raw_by_choice"))
	}
}
