package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"time"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
)

// The squeeze bench (-squeeze): a guest with a balloon that read half its
// RAM of files from its disk, saved by kvmckpt as it is, by kvmckpt
// --squeeze (the balloon takes the page cache first), and by QEMU's own
// save; against the guest's memory it cannot give back.

// Tools of the squeeze bench.
const (
	squeezePlain = "kvmckpt"
	squeezeAuto  = "kvmckpt --squeeze"
	squeezeQEMU  = "qemu-save"
)

// squeezeRow is one save.
type squeezeRow struct {
	Tool    string  `json:"tool"`
	Rep     int     `json:"rep"`
	Bytes   int64   `json:"bytes"`
	PauseMS float64 `json:"pause_ms"`
	TotalMS float64 `json:"total_ms"`
	// SqueezeMS is the balloon's inflation before the save; TakenBytes
	// what it took.
	SqueezeMS  float64 `json:"squeeze_ms,omitempty"`
	TakenBytes int64   `json:"taken_bytes,omitempty"`
	Failure    string  `json:"failure,omitempty"`
}

// squeezeResult is the squeeze bench's result.
type squeezeResult struct {
	MemMiB, FilesMiB int
	// Guest's /proc/meminfo after reading its files, KiB.
	AnonKB, ShmemKB, CachedKB, SUnreclaimKB, KernelStackKB, PageTablesKB uint64
	// NonReclaimable is what the guest cannot give back without swap:
	// anonymous memory, shmem and tmpfs, and the kernel's own.
	NonReclaimable int64
	Rows           []squeezeRow
}

var meminfoRE = regexp.MustCompile(`KW MEMINFO anon_kb=(\d+) shmem_kb=(\d+) cached_kb=(\d+) sunreclaim_kb=(\d+) kernelstack_kb=(\d+) pagetables_kb=(\d+)`)

func (b *bench) squeeze(ctx context.Context, r *report) error {
	mem := b.cfg.MemMiB
	res := &squeezeResult{MemMiB: mem, FilesMiB: mem / 2}
	r.Squeeze = res
	b.logf("squeeze: making a disk with %d MiB of files", res.FilesMiB)
	disk, err := vmtest.MakeDiskIn(b.work, res.FilesMiB)
	if err != nil {
		return err
	}
	defer os.Remove(disk)
	cfg := vmtest.Config{MemMiB: mem, Balloon: "on", Disk: disk, Machine: b.cfg.Machine, CPUs: b.cfg.CPUs, QEMU: b.cfg.QEMU,
		// The guest checks its files rarely (a check re-reads them all):
		// between repetitions, to fill its page cache again.
		Workload: vmtest.Workload{Anon: mem / 10, Tmpfs: mem / 20, Text: mem / 20, Files: res.FilesMiB, Interval: 120}}
	g, err := vmtest.Start(ctx, cfg)
	if err != nil {
		return fmt.Errorf("boot guest: %w", err)
	}
	defer g.Close()
	if m, _, err := g.WaitSerial(ctx, readyRE, 0, bootTimeout(mem)+5*time.Minute); err != nil || m != "KW READY" {
		return fmt.Errorf("boot guest: %v %s", err, m)
	}
	m := meminfoRE.FindStringSubmatch(g.Serial())
	if m == nil {
		return fmt.Errorf("the guest printed no MEMINFO line")
	}
	kb := func(i int) uint64 { n, _ := strconv.ParseUint(m[i], 10, 64); return n }
	res.AnonKB, res.ShmemKB, res.CachedKB, res.SUnreclaimKB, res.KernelStackKB, res.PageTablesKB = kb(1), kb(2), kb(3), kb(4), kb(5), kb(6)
	res.NonReclaimable = int64(res.AnonKB+res.ShmemKB+res.SUnreclaimKB+res.KernelStackKB+res.PageTablesKB) << 10
	dir, err := os.MkdirTemp(b.work, "squeeze-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	// The squeezed save last: the guest's page cache is gone after it.
	tools := []string{squeezePlain, squeezeQEMU, squeezeAuto}
	for rep := range b.cfg.Reps {
		for _, tool := range tools {
			if err := syncfs(b.work); err != nil {
				return err
			}
			time.Sleep(2 * time.Second)
			row, err := b.squeezeSave(ctx, g, tool, dir, mem)
			row.Rep = rep
			if err != nil {
				row.Failure = err.Error()
			}
			res.Rows = append(res.Rows, row)
			b.logf("squeeze %s: %.0f MiB, paused %.0f ms, total %.0f ms (squeeze %.0f ms)", tool, mib(row.Bytes), row.PauseMS, row.TotalMS, row.SqueezeMS)
			if err != nil {
				return err
			}
			if tool == squeezeAuto && rep+1 < b.cfg.Reps {
				if err := b.refill(ctx, g); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// refill waits until the guest has read its files back into its page
// cache (its next check of them re-reads them all), for the next
// repetition: a save after a squeeze would otherwise find no cache.
func (b *bench) refill(ctx context.Context, g *vmtest.Guest) error {
	_, _, err := g.WaitSerial(ctx, regexp.MustCompile(`KW FILES OK`), len(g.Serial()), 15*time.Minute)
	return err
}

func (b *bench) squeezeSave(ctx context.Context, g *vmtest.Guest, tool, dir string, mem int) (squeezeRow, error) {
	row := squeezeRow{Tool: tool}
	timeout := opTimeout(mem) + 5*time.Minute
	switch tool {
	case squeezeQEMU:
		out := filepath.Join(dir, "qemu.save")
		defer os.Remove(out)
		var cr childResult
		pr, err := b.child(ctx, childSpec{Mode: modeQEMUSave, QMP: g.QMPPath, Output: out, Timeout: timeout, Copier: b.cfg.Copier}, &cr)
		if err != nil {
			return row, err
		}
		row.PauseMS, row.TotalMS = cr.PauseMS, ms(pr.Wall)
		size, err := sizeOf(out)
		if err != nil {
			return row, err
		}
		row.Bytes = size.Allocated
	default:
		out := filepath.Join(dir, "guest.kvmckpt")
		defer os.Remove(out)
		args := []string{b.kvmckpt, "save", "--qmp", g.QMPPath, "-o", out, "--json"}
		if tool == squeezeAuto {
			args = append(args, "--squeeze")
		}
		pr, err := runProc(ctx, timeout, nil, args...)
		if err != nil {
			return row, err
		}
		var js struct {
			PauseMS      float64 `json:"pause_ms"`
			BytesWritten int64   `json:"bytes_written"`
			Squeeze      *struct {
				Taken     int64   `json:"taken_bytes"`
				InflateMS float64 `json:"inflate_ms"`
			} `json:"squeeze"`
		}
		if err := json.Unmarshal(pr.Stdout, &js); err != nil {
			return row, fmt.Errorf("decode kvmckpt save output: %w", err)
		}
		row.PauseMS, row.TotalMS = js.PauseMS, ms(pr.Wall)
		if js.Squeeze != nil {
			row.SqueezeMS, row.TakenBytes = js.Squeeze.InflateMS, js.Squeeze.Taken
		}
		size, err := sizeOf(out)
		if err != nil {
			return row, err
		}
		row.Bytes = size.Allocated
	}
	if running, state, err := isRunning(ctx, g.QMPPath); err != nil || !running {
		return row, fmt.Errorf("guest not running after the save (%s): %v", state, err)
	}
	return row, nil
}

// writeSqueeze prints the squeeze bench's table and the targets.
func writeSqueeze(w io.Writer, s *squeezeResult) {
	fmt.Fprintf(w, "\n## Squeeze: a %d MiB guest that read %d MiB of files\n\n", s.MemMiB, s.FilesMiB)
	fmt.Fprintf(w, "Guest's memory it cannot give back (anonymous %d MiB, shmem %d MiB, kernel %d MiB): %.0f MiB; page cache %d MiB.\n\n",
		s.AnonKB>>10, s.ShmemKB>>10, (s.SUnreclaimKB+s.KernelStackKB+s.PageTablesKB)>>10, mib(s.NonReclaimable), s.CachedKB>>10)
	fmt.Fprintf(w, "| save | rep | file MiB | pause ms | total ms | squeeze ms | balloon took MiB |\n|---|---|---|---|---|---|---|\n")
	best := map[string]squeezeRow{}
	for _, r := range s.Rows {
		if r.Failure != "" {
			fmt.Fprintf(w, "| %s | %d | failed: %s | | | | |\n", r.Tool, r.Rep, r.Failure)
			continue
		}
		fmt.Fprintf(w, "| %s | %d | %.0f | %.0f | %.0f | %.0f | %.0f |\n", r.Tool, r.Rep, mib(r.Bytes), r.PauseMS, r.TotalMS, r.SqueezeMS, mib(r.TakenBytes))
		if b, ok := best[r.Tool]; !ok || r.TotalMS < b.TotalMS {
			best[r.Tool] = r
		}
	}
	sq, ok1 := best[squeezeAuto]
	q, ok2 := best[squeezeQEMU]
	if ok1 && s.NonReclaimable > 0 {
		ratio := float64(sq.Bytes) / float64(s.NonReclaimable)
		fmt.Fprintf(w, "\nTarget: the squeezed file holds at most 1.1x the memory the guest cannot give back: %.2fx (%s).\n", ratio, met(ratio <= 1.1))
	}
	if ok1 && ok2 {
		fmt.Fprintf(w, "Target: the whole squeezed save, squeeze included, is faster than QEMU's own: %.0f ms vs %.0f ms (%s).\n", sq.TotalMS, q.TotalMS, met(sq.TotalMS < q.TotalMS))
	}
}
