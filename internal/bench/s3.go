package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/kvmckpt/kvmckpt/internal/s3test"
	"github.com/kvmckpt/kvmckpt/internal/vmtest"
	"github.com/kvmckpt/kvmckpt/objstore"
)

// The object storage bench (-s3): the default bench guest saved by
// kvmckpt stop-and-copy into a local file and into a local S3-compatible
// store (SeaweedFS on the loopback, its data on the same disk as the
// file), alternated; each checkpoint is then restored from where it was
// saved into a new QEMU, which verifies its data. With -s3-url the store
// is the user's: a bucket (and prefix) of any S3-compatible store, found
// as kvmckpt finds one.

const (
	targetFile = "file"
	targetS3   = "s3"
)

// s3Row is one save and restore.
type s3Row struct {
	Target       string  `json:"target"`
	Rep          int     `json:"rep"`
	PauseMS      float64 `json:"pause_ms"`
	PagesMS      float64 `json:"pages_ms"`
	PagesSaved   float64 `json:"pages_saved"`
	BytesWritten float64 `json:"bytes_written"`
	// StoreBps is the store's own upload rate, bytes/s, measured right
	// after an S3 save: BytesWritten of random bytes uploaded the same
	// way (parts of 16 MiB, eight at a time), without kvmckpt's work.
	StoreBps    float64 `json:"store_upload_bytes_per_s,omitempty"`
	RestoreMS   float64 `json:"restore_ms"`
	RestorePgMS float64 `json:"restore_pages_ms"`
	// RestoreCPUMS is the CPU time of the kvmckpt restore process.
	RestoreCPUMS float64 `json:"restore_cpu_ms"`
	Verified     bool    `json:"verified"`
	Failure      string  `json:"failure,omitempty"`
}

// SaveBps is the pages' raw bytes over the pause: what the save moves
// while the guest waits, the upload's completion included.
func (r s3Row) SaveBps() float64 { return r.PagesSaved * 4096 / max(r.PauseMS/1000, 1e-3) }

// StoredBps is the bytes written over the pause.
func (r s3Row) StoredBps() float64 { return r.BytesWritten / max(r.PauseMS/1000, 1e-3) }

// RestoreBps is the pages' raw bytes over the restore's pages phase.
func (r s3Row) RestoreBps() float64 { return r.PagesSaved * 4096 / max(r.RestorePgMS/1000, 1e-3) }

type s3Result struct {
	Workload workload `json:"workload"`
	Rows     []s3Row  `json:"rows"`
}

func (b *bench) s3(ctx context.Context, r *report) error {
	w := newWorkload(b.cfg, b.cfg.MemMiB, b.cfg.Churn)
	res := &s3Result{Workload: w}
	r.S3 = res
	dir, err := os.MkdirTemp(b.work, "s3-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	prefix := strings.TrimSuffix(b.cfg.S3URL, "/")
	if prefix == "" {
		srv, err := s3test.Start(filepath.Join(dir, "store"))
		if err != nil {
			return err
		}
		defer srv.Stop()
		if err := srv.Bucket("bench"); err != nil {
			return err
		}
		// The kvmckpt processes find the store the way an operator's do.
		for k, v := range srv.Env() {
			os.Setenv(k, v)
		}
		prefix = "s3://bench"
		b.logf("S3 store: SeaweedFS at %s", srv.Endpoint)
	}
	b.logf("boot %d MiB guest: churn %d MiB, keep %d+%d MiB, text %d MiB; checkpoints under %s", w.MemMiB, w.ChurnMiB, w.AnonMiB, w.TmpfsMiB, w.TextMiB, prefix)
	g, err := bootReady(ctx, w.guest(), w.MemMiB)
	if err != nil {
		return err
	}
	defer g.Close()
	if _, err := runProc(ctx, opTimeout(w.MemMiB), nil, b.kvmckpt, "scan", "--qmp", g.QMPPath, "--json"); err != nil {
		return fmt.Errorf("warm-up scan: %w", err)
	}
	outs := map[string]string{targetFile: filepath.Join(dir, "vm.kvmckpt"), targetS3: prefix + "/vm.kvmckpt"}
	order := []string{targetFile, targetS3}
	for rep := range b.cfg.Reps {
		o := slices.Clone(order)
		if rep%2 == 1 {
			slices.Reverse(o)
		}
		for _, t := range o {
			row := s3Row{Target: t, Rep: rep}
			err := b.s3Save(ctx, g, w, outs[t], &row)
			if err != nil {
				row.Failure = err.Error()
			}
			res.Rows = append(res.Rows, row)
			b.logf("rep %d: %s: pause %.0f ms, %.0f MB/s raw; restore pages %.0f ms, %.0f MB/s; verified %v",
				rep+1, t, row.PauseMS, row.SaveBps()/1e6, row.RestorePgMS, row.RestoreBps()/1e6, row.Verified)
			if err != nil {
				return err
			}
		}
	}
	return nil
}

func (b *bench) s3Save(ctx context.Context, g *vmtest.Guest, w workload, out string, row *s3Row) error {
	if err := b.settle(ctx, g, w); err != nil {
		return err
	}
	pr, err := runProc(ctx, opTimeout(w.MemMiB), nil, b.kvmckpt, "save", "--qmp", g.QMPPath, "-o", out, "--json")
	if err != nil {
		return err
	}
	var js struct {
		PauseMS      float64 `json:"pause_ms"`
		PagesMS      float64 `json:"pages_ms"`
		PagesSaved   float64 `json:"pages_saved"`
		BytesWritten float64 `json:"bytes_written"`
	}
	if err := json.Unmarshal(pr.Stdout, &js); err != nil {
		return fmt.Errorf("decode save output: %w", err)
	}
	row.PauseMS, row.PagesMS, row.PagesSaved, row.BytesWritten = js.PauseMS, js.PagesMS, js.PagesSaved, js.BytesWritten
	if strings.HasPrefix(out, "s3://") {
		ceiling := out[:strings.LastIndexByte(out, '/')+1] + "kvmckpt-bench-ceiling"
		if row.StoreBps, err = storeUpload(ctx, ceiling, int64(js.BytesWritten)); err != nil {
			return fmt.Errorf("the store's upload rate: %w", err)
		}
	}
	// Restore into a new QEMU, the source paused meanwhile, the file
	// (and the store's data) written out first.
	if err := syncfs(b.work); err != nil {
		return err
	}
	m, err := b.restorePaused(ctx, g, w, out)
	row.RestoreMS, row.RestorePgMS, row.RestoreCPUMS, row.Verified = m.TotalMS, m.Detail["pages_ms"], m.ToolCPUMS, m.Verified
	return err
}

// storeUpload uploads n random bytes to name as a save does and returns
// the rate, bytes/s: the store's ceiling for a save.
func storeUpload(ctx context.Context, name string, n int64) (float64, error) {
	buf := make([]byte, 16<<20)
	rand.Read(buf)
	s := objstore.New(objstore.Config{})
	t := time.Now()
	u, err := s.Create(ctx, name, n)
	if err != nil {
		return 0, err
	}
	defer u.Abort()
	for left := n; left > 0; left -= int64(len(buf)) {
		if _, err := u.Write(buf[:min(int64(len(buf)), left)]); err != nil {
			return 0, err
		}
	}
	if err := u.Commit(); err != nil {
		return 0, err
	}
	return float64(n) / time.Since(t).Seconds(), nil
}

func writeS3(w io.Writer, s *s3Result) {
	fmt.Fprintf(w, "\n## Object storage: the default guest (%d MiB, %d MiB freed, %d+%d MiB kept, %d MiB text) saved to a local file and to a local S3 store (SeaweedFS), alternated\n\n",
		s.Workload.MemMiB, s.Workload.ChurnMiB, s.Workload.AnonMiB, s.Workload.TmpfsMiB, s.Workload.TextMiB)
	fmt.Fprintf(w, "Save MB/s: the pages in use (4 KiB each) over the pause (the upload's completion included). Store MB/s: the store's own upload rate for the same byte count, right after (random bytes, no kvmckpt work); stored MB/s: the bytes written over the pause. Restore MB/s: the pages' bytes over the restore's pages phase.\n\n")
	fmt.Fprintf(w, "| target | rep | pause ms | pages ms | MiB written | save MB/s | stored MB/s | store MB/s | restore ms | restore CPU ms | restore pages ms | restore MB/s | verified |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n")
	for _, r := range s.Rows {
		if r.Failure != "" {
			fmt.Fprintf(w, "| %s | %d | failed: %s |||||||||||\n", r.Target, r.Rep+1, r.Failure)
			continue
		}
		store := "-"
		if r.StoreBps > 0 {
			store = fmt.Sprintf("%.0f", r.StoreBps/1e6)
		}
		fmt.Fprintf(w, "| %s | %d | %.0f | %.0f | %.1f | %.0f | %.0f | %s | %.0f | %.0f | %.0f | %.0f | %v |\n",
			r.Target, r.Rep+1, r.PauseMS, r.PagesMS, r.BytesWritten/(1<<20), r.SaveBps()/1e6, r.StoredBps()/1e6, store, r.RestoreMS, r.RestoreCPUMS, r.RestorePgMS, r.RestoreBps()/1e6, r.Verified)
	}
	med := func(t string, f func(s3Row) float64) float64 {
		var v []float64
		for _, r := range s.Rows {
			if r.Target == t && r.Failure == "" {
				v = append(v, f(r))
			}
		}
		return summarize(v).Median
	}
	sf, ss := med(targetFile, s3Row.SaveBps), med(targetS3, s3Row.SaveBps)
	rf, rs := med(targetFile, s3Row.RestoreBps), med(targetS3, s3Row.RestoreBps)
	fmt.Fprintf(w, "\nMedians: save %.0f MB/s to the file, %.0f MB/s to S3 (%.2fx); restore %.0f MB/s from the file, %.0f MB/s from S3 (%.2fx).\n",
		sf/1e6, ss/1e6, ss/max(sf, 1), rf/1e6, rs/1e6, rs/max(rf, 1))
	fmt.Fprintf(w, "Target: S3 at 0.7x of the file or more: save %s, restore %s.\n", met(ss >= 0.7*sf), met(rs >= 0.7*rf))
	if c := med(targetS3, func(r s3Row) float64 { return r.StoreBps }); c > 0 {
		st := med(targetS3, s3Row.StoredBps)
		fmt.Fprintf(w, "The store's own upload rate: %.0f MB/s; the S3 saves wrote %.0f MB/s, %.0f%% of it.\n", c/1e6, st/1e6, 100*st/c)
	}
}
