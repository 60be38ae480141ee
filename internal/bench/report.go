package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
)

// report is what a run writes to -out.
type report struct {
	Generated time.Time `json:"generated"`
	Command   string    `json:"command"`
	Machine   machine   `json:"machine"`
	Config    config    `json:"config"`
	// Result is the main measurement; Sweep the sweep's points.
	Result *pointResult   `json:"result,omitempty"`
	Sweep  []*pointResult `json:"sweep,omitempty"`
	Live   []*livePoint   `json:"live,omitempty"`
	// Squeeze is the squeeze bench's result (-squeeze).
	Squeeze *squeezeResult `json:"squeeze,omitempty"`
	// Incremental is the incremental bench's result (-incremental).
	Incremental *incrementalResult `json:"incremental,omitempty"`
	// Limit is the limit bench's result (-limit).
	Limit *limitResult `json:"limit,omitempty"`
	// S3 is the object storage bench's result (-s3).
	S3    *s3Result `json:"s3,omitempty"`
	Error string    `json:"error,omitempty"`
}

// machine describes the host.
type machine struct {
	Cores       int       `json:"cores"`
	CPUModel    string    `json:"cpu_model"`
	MemTotalMiB int       `json:"mem_total_mib"`
	Accel       string    `json:"accelerator"`
	QEMU        string    `json:"qemu"`
	Kernel      string    `json:"kernel"`
	Go          string    `json:"go"`
	Dir         string    `json:"dir"`
	Disk        mountInfo `json:"disk"`
}

// probeMachine describes the host, the emulator qemu (a vmtest.Config.QEMU
// setting) and the filesystem of dir.
func probeMachine(ctx context.Context, dir, qemu string) machine {
	m := machine{Cores: runtime.NumCPU(), Accel: vmtest.Accel(), Go: runtime.Version(), Dir: dir}
	m.CPUModel = firstField("/proc/cpuinfo", "model name")
	if kb, err := strconv.Atoi(strings.Fields(firstField("/proc/meminfo", "MemTotal") + " 0")[0]); err == nil {
		m.MemTotalMiB = kb >> 10
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	prog, _ := vmtest.QEMUPath(qemu)
	if out, err := exec.CommandContext(ctx, prog, "--version").Output(); err == nil {
		m.QEMU = strings.TrimPrefix(strings.SplitN(string(out), "\n", 2)[0], "QEMU emulator version ")
	}
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		m.Kernel = unix.ByteSliceToString(u.Release[:])
	}
	if mi, err := mountOf(dir); err == nil {
		m.Disk = mi
	}
	return m
}

// firstField returns the value of the first "key: value" line of a /proc
// file that starts with key.
func firstField(path, key string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == key {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// writeJSON writes the report to path, creating its directory.
func writeJSON(path string, r *report) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("write results: %w", err)
	}
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("write results: %w", err)
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write results: %w", err)
	}
	return nil
}

// writeMarkdown prints the report's tables.
func writeMarkdown(w io.Writer, r *report) {
	m := r.Machine
	title := "kvmckpt against QEMU's own save"
	if r.Limit != nil {
		title = "kvmckpt's stop-and-copy against the disk's and memory's limits"
	}
	if r.S3 != nil {
		title = "kvmckpt saving to and restoring from S3-compatible object storage"
	}
	fmt.Fprintf(w, "# %s\n\n", title)
	fmt.Fprintf(w, "- machine: %d cores (%s), %.1f GiB RAM, accelerator **%s**, QEMU %s, Linux %s, %s\n",
		m.Cores, m.CPUModel, float64(m.MemTotalMiB)/1024, m.Accel, m.QEMU, m.Kernel, m.Go)
	fmt.Fprintf(w, "- disk: checkpoint files in %s: %s on %s (mounted on %s)", m.Dir, m.Disk.FSType, m.Disk.Source, m.Disk.MountPoint)
	if r.Config.Cold {
		fmt.Fprintf(w, "; restores read them cold (evicted from the page cache first)")
	}
	fmt.Fprintf(w, "\n- command: `%s`\n", r.Command)
	if r.Result != nil {
		writePoint(w, r.Result, r.Config.Reps, r.Config.Copier)
	}
	if len(r.Sweep) > 0 {
		writeSweep(w, r.Sweep)
	}
	if len(r.Live) > 0 {
		writeLive(w, r.Live)
	}
	if r.Squeeze != nil {
		writeSqueeze(w, r.Squeeze)
	}
	if r.Limit != nil {
		writeLimit(w, r.Limit)
	}
	if r.S3 != nil {
		writeS3(w, r.S3)
	}
	if r.Incremental != nil {
		writeIncremental(w, r.Incremental)
	}
	if r.Error != "" {
		fmt.Fprintf(w, "\n**The run failed:** %s\n", r.Error)
	}
}

func writePoint(w io.Writer, p *pointResult, reps int, copier string) {
	wl := p.Workload
	fmt.Fprintf(w, "- guest: %s, %d vCPU, %d MiB; workload filled %d MiB (%.0f%%) with random data and freed it, "+
		"keeps %d+%d MiB incompressible (anonymous+tmpfs) and %d MiB compressible text, verifies it every %d s; "+
		"booted and shaped in %.1f s\n",
		wl.Machine, wl.CPUs, wl.MemMiB, wl.ChurnMiB, 100*float64(wl.ChurnMiB)/float64(wl.MemMiB), wl.AnonMiB, wl.TmpfsMiB, wl.TextMiB, wl.IntervalS, p.BootMS/1000)
	fmt.Fprintf(w, "- %d repetitions on the same guest, order alternating; cells are median (min–max)\n", reps)
	var loads []float64
	for _, m := range p.Measurements {
		loads = append(loads, m.Load1)
	}
	if l := summarize(loads); l.N > 0 {
		fmt.Fprintf(w, "- host load average (1 min) as the operations started: %s (other work on the machine competes for its %d cores)\n",
			cellf(l, 1), runtime.NumCPU())
	}

	fmt.Fprintf(w, "\n## Save (running guest → paused → running, checkpoint durable)\n\n")
	fmt.Fprintf(w, "| tool | guest paused ms | total ms | written MiB (allocated) | apparent MiB | tool CPU ms | QEMU CPU ms | tool peak RSS MiB | pause vs QEMU | bytes vs QEMU | disk alone ms (dd-style / O_DIRECT) |\n")
	fmt.Fprintf(w, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, s := range p.Summary {
		if s.Op != opSave {
			continue
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %.0f / %.0f |\n",
			toolNames[s.Tool], cell(s.PauseMS, 1, 0), cell(s.TotalMS, 1, 0),
			cell(s.Allocated, 1<<20, 1), cell(s.Apparent, 1<<20, 1),
			cell(s.ToolCPUMS, 1, 0), cell(s.QEMUCPUMS, 1, 0), cell(s.ToolMaxRSS, 1<<20, 0),
			times(s.PauseVsQEMU), times(s.BytesVsQEMU), s.DiskAloneMS, s.DiskDirectMS)
	}

	fmt.Fprintf(w, "\n## Restore (until the restored guest runs)\n\n")
	fmt.Fprintf(w, "| tool | to running ms | incl. QEMU start ms | tool CPU ms | QEMU CPU ms | tool peak RSS MiB | vs QEMU | data verified after |\n")
	fmt.Fprintf(w, "|---|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, s := range p.Summary {
		if s.Op != opRestore {
			continue
		}
		toolCPU, rss := cell(s.ToolCPUMS, 1, 0), cell(s.ToolMaxRSS, 1<<20, 0)
		if s.Tool == toolQEMU || s.Tool == toolMappedRAM {
			toolCPU, rss = "— (QEMU alone)", "—"
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s | %d/%d |\n",
			restoreName(s.Tool), cell(s.TotalMS, 1, 0), cell(s.WithStartMS, 1, 0), toolCPU, cell(s.QEMUCPUMS, 1, 0), rss,
			times(s.TotalVsQEMU), s.Verified, s.Runs)
	}

	fmt.Fprintf(w, "\n## The disk's limit (same run, same directory, same byte counts)\n\n")
	fmt.Fprintf(w, "| durable sequential write of | how | MiB | disk MiB/s | tool's MiB/s (written / total save time) | tool's share of the disk | same, by guest pause | disk alone ms |\n")
	fmt.Fprintf(w, "|---|---|--:|--:|--:|--:|--:|--:|\n")
	for _, d := range p.Disk.Rows {
		fmt.Fprintf(w, "| %s's bytes | %s | %s | %s | %s | %s | %s | %s |\n",
			d.Tool, diskModeNames[d.Mode], cell(d.Bytes, 1<<20, 0), cell(d.MiBps, 1, 0), cell(d.ToolMiBps, 1, 0),
			pct(d.Fraction), pct(d.PauseFraction), cell(d.DiskAloneMS, 1, 0))
	}

	k := p.KvmckptSave
	med := func(key string) float64 { return k[key].Median }
	fmt.Fprintf(w, "\n## Where kvmckpt's save time goes (medians, from its --json)\n\n")
	fmt.Fprintf(w, "| scan ms | pages ms | device state ms | sync ms | guest paused ms | kvmckpt's own total ms | process total ms | pages saved / total | free | zero | hole | device state KiB |\n")
	fmt.Fprintf(w, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	if ks, ok := findSummary(p.Summary, opSave, toolKvmckpt); ok {
		fmt.Fprintf(w, "| %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f | %.0f / %.0f | %.0f | %.0f | %.0f | %.0f |\n",
			med("scan_ms"), med("pages_ms"), med("device_state_ms"), med("sync_ms"), med("pause_ms"), med("duration_ms"),
			ks.TotalMS.Median, med("pages_saved"), med("pages_total"), med("pages_free"), med("pages_zero"), med("pages_hole"),
			med("device_state_bytes")/1024)
	}
	fmt.Fprintf(w, "\nkvmckpt's first run on this kernel (warm-up scan, finds or builds the kernel profile): %.0f ms, not in the table.\n", p.WarmupMS)
	fmt.Fprintf(w, "QEMU's save: tool CPU and RSS are those of the copier that writes QEMU's stream to the file (-copier %s); "+
		"QEMU CPU is QEMU's own, from /proc/PID/stat. kvmckpt's RSS counts the guest RAM pages it maps and reads.\n", copier)
	for _, f := range p.Failures {
		fmt.Fprintf(w, "\n**Failure:** %s\n", f)
	}
}

func writeSweep(w io.Writer, points []*pointResult) {
	fmt.Fprintf(w, "\n## Sweep: guest RAM × share of RAM freed (one repetition each)\n\n")
	fmt.Fprintf(w, "| RAM MiB | freed MiB | QEMU paused ms | naive paused ms | kvmckpt paused ms | QEMU MiB | naive MiB | kvmckpt MiB | kvmckpt pause vs QEMU | kvmckpt bytes vs QEMU | QEMU restore ms | kvmckpt restore ms | verified | saved first |\n")
	fmt.Fprintf(w, "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n")
	for _, p := range points {
		get := func(op, tool string) summary { s, _ := findSummary(p.Summary, op, tool); return s }
		q, n, k := get(opSave, toolQEMU), get(opSave, toolNaive), get(opSave, toolKvmckpt)
		qr, kr := get(opRestore, toolQEMU), get(opRestore, toolKvmckpt)
		verified := fmt.Sprintf("%d/%d", qr.Verified+kr.Verified, qr.Runs+kr.Runs)
		if len(p.Failures) > 0 {
			verified += " (" + p.Failures[0] + ")"
		}
		first := ""
		for _, m := range p.Measurements {
			if m.Op == opSave && m.Position == 1 {
				first = m.Tool
			}
		}
		fmt.Fprintf(w, "| %d | %d (%.0f%%) | %.0f | %.0f | %.0f | %.1f | %.1f | %.1f | %s | %s | %.0f | %.0f | %s | %s |\n",
			p.Workload.MemMiB, p.Workload.ChurnMiB, 100*float64(p.Workload.ChurnMiB)/float64(p.Workload.MemMiB),
			q.PauseMS.Median, n.PauseMS.Median, k.PauseMS.Median,
			mib(int64(q.Allocated.Median)), mib(int64(n.Allocated.Median)), mib(int64(k.Allocated.Median)),
			times(k.PauseVsQEMU), times(k.BytesVsQEMU), qr.TotalMS.Median, kr.TotalMS.Median, verified, first)
	}
}

var diskModeNames = map[string]string{
	diskBuffered: "dd-style: write(2) via page cache, fdatasync",
	diskDirect:   "O_DIRECT, fdatasync",
}

func restoreName(tool string) string {
	switch tool {
	case toolQEMU:
		return "QEMU's own restore (-incoming from the file)"
	case toolMappedRAM:
		return "QEMU's mapped-ram restore (file:, same multifd and direct-io)"
	}
	return "kvmckpt restore --resume"
}

// cell formats a stat divided by scale as "median (min–max)", or the
// median alone for one run or no spread.
func cell(s stat, scale float64, prec int) string {
	if s.N == 0 {
		return "—"
	}
	f := func(v float64) string { return strconv.FormatFloat(v/scale, 'f', prec, 64) }
	if s.N == 1 || f(s.Min) == f(s.Max) {
		return f(s.Median)
	}
	return fmt.Sprintf("%s (%s–%s)", f(s.Median), f(s.Min), f(s.Max))
}

// cellf is [cell] for unscaled values with prec decimals.
func cellf(s stat, prec int) string { return cell(s, 1, prec) }

func times(r float64) string {
	if r == 0 {
		return "—"
	}
	return fmt.Sprintf("%.2f×", r)
}

func pct(s stat) string {
	if s.N == 0 {
		return "—"
	}
	if s.N == 1 {
		return fmt.Sprintf("%.0f%%", 100*s.Median)
	}
	return fmt.Sprintf("%.0f%% (%.0f–%.0f%%)", 100*s.Median, 100*s.Min, 100*s.Max)
}
