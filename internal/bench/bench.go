package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
	"github.com/kvmckpt/kvmckpt/qmp"
)

// Tools, as they appear in results.
const (
	toolQEMU    = "qemu"
	toolNaive   = "naive"
	toolKvmckpt = "kvmckpt"
	// toolMappedRAM is QEMU 8.2+'s best save to a file: mapped-ram with
	// multifd channels and direct-io (what `virsh save --image-format
	// sparse --parallel-channels 2 --bypass-cache` asks of QEMU).
	toolMappedRAM = "qemu-mapped-ram"
)

// Operations.
const (
	opSave    = "save"
	opRestore = "restore"
)

// toolNames are the tools' names in tables.
var toolNames = map[string]string{
	toolQEMU:      "QEMU's own save (migrate to file, fsync)",
	toolNaive:     "naive sparse copy of the RAM file",
	toolKvmckpt:   "kvmckpt",
	toolMappedRAM: fmt.Sprintf("QEMU mapped-ram + %d multifd + direct-io", multifdChannels),
}

// saveOrder alternates the order of the saves across repetitions, so that
// no tool always comes first (after the guest was quiet longest) or last.
// mappedRAM adds QEMU's mapped-ram save (QEMU 8.2 and later).
func saveOrder(rep int, mappedRAM bool) []string {
	order := []string{toolQEMU, toolNaive, toolKvmckpt}
	if mappedRAM {
		order = []string{toolQEMU, toolMappedRAM, toolNaive, toolKvmckpt}
	}
	if rep%2 == 1 {
		slices.Reverse(order)
	}
	return order
}

func restoreOrder(rep int, mappedRAM bool) []string {
	order := []string{toolQEMU, toolKvmckpt}
	if mappedRAM {
		order = []string{toolQEMU, toolMappedRAM, toolKvmckpt}
	}
	if rep%2 == 1 {
		slices.Reverse(order)
	}
	return order
}

// churnReserve is what a guest needs besides the churned memory: the
// workload holds all of it at once, half in tmpfs and half anonymous, and a
// 1 GiB guest that churns 90% of its RAM runs out of memory and panics
// (measured: 800 MiB of 1024 works, 921 does not).
const churnReserve = 224

// workload is the guest's memory shape, in MiB.
type workload struct {
	MemMiB   int `json:"mem_mib"`
	ChurnMiB int `json:"churn_mib"`
	AnonMiB  int `json:"anon_mib"`
	TmpfsMiB int `json:"tmpfs_mib"`
	TextMiB  int `json:"text_mib"`
	// IntervalS is the period of the guest's verification of its data.
	IntervalS int    `json:"interval_s"`
	CPUs      int    `json:"cpus"`
	Machine   string `json:"machine"`
	// QEMU is the emulator (vmtest.Config.QEMU): "" bookworm's 7.2,
	// "10.0" the backported one.
	QEMU string `json:"qemu,omitempty"`
	// RAM is the kind of RAM (vmtest.Config.RAM).
	RAM string `json:"ram,omitempty"`
}

// newWorkload shapes a guest of mem MiB: churn of it filled with non-zero
// data and freed (at most mem-churnReserve), c.Keep kept incompressible
// (half anonymous, half in tmpfs) and c.Text kept compressible; machine
// type and vCPUs from c.
func newWorkload(c config, mem int, churn float64) workload {
	frac := func(f float64) int { return int(math.Round(f * float64(mem))) }
	return workload{
		MemMiB:    mem,
		ChurnMiB:  min(frac(churn), mem-churnReserve),
		AnonMiB:   frac(c.Keep / 2),
		TmpfsMiB:  frac(c.Keep / 2),
		TextMiB:   frac(c.Text),
		IntervalS: c.Interval,
		CPUs:      c.CPUs,
		Machine:   c.Machine,
		QEMU:      c.QEMU,
		RAM:       c.RAM,
	}
}

func (w workload) guest() vmtest.Config {
	return vmtest.Config{
		QEMU:    w.QEMU,
		Machine: w.Machine,
		MemMiB:  w.MemMiB,
		CPUs:    w.CPUs,
		RAM:     w.RAM,
		Workload: vmtest.Workload{
			Churn: w.ChurnMiB, Anon: w.AnonMiB, Tmpfs: w.TmpfsMiB, Text: w.TextMiB,
			Interval: w.IntervalS,
		},
	}
}

// measurement is one save or restore by one tool.
type measurement struct {
	Tool     string `json:"tool"`
	Op       string `json:"op"`
	Rep      int    `json:"rep"`
	Position int    `json:"position"` // place in the repetition's order, from 1
	// PauseMS is how long the guest was stopped (saves): from the stop
	// command until the guest ran again.
	PauseMS float64 `json:"pause_ms,omitempty"`
	// TotalMS is the tool's whole run: the child process's lifetime for
	// saves and kvmckpt's restore; from migrate-incoming until the guest
	// runs for QEMU's restore.
	TotalMS float64 `json:"total_ms"`
	// WithStartMS is a restore including the start of the target QEMU.
	WithStartMS float64 `json:"with_qemu_start_ms,omitempty"`
	Allocated   int64   `json:"allocated_bytes,omitempty"`
	Apparent    int64   `json:"apparent_bytes,omitempty"`
	// ToolCPUMS and ToolMaxRSS are the tool process's (the copier for
	// QEMU's save; none for QEMU's restore, which is QEMU alone).
	ToolCPUMS  float64 `json:"tool_cpu_ms"`
	ToolMaxRSS int64   `json:"tool_max_rss_bytes"`
	// QEMUCPUMS is the QEMU process's CPU time over the operation, with
	// its exec: helpers once reaped.
	QEMUCPUMS float64 `json:"qemu_cpu_ms"`
	// Load1 is the host's one-minute load average when the operation
	// started: other work on the machine shows here.
	Load1    float64            `json:"load1"`
	Verified bool               `json:"verified,omitempty"`
	Failure  string             `json:"failure,omitempty"`
	Detail   map[string]float64 `json:"detail,omitempty"`
}

// pointResult is everything measured on one guest.
type pointResult struct {
	Workload     workload      `json:"workload"`
	BootMS       float64       `json:"boot_ms"`
	WarmupMS     float64       `json:"warmup_scan_ms"`
	Measurements []measurement `json:"measurements"`
	DiskRuns     []diskRun     `json:"disk_runs"`
	Summary      []summary     `json:"summary"`
	Disk         diskSummary   `json:"disk"`
	// KvmckptSave are the medians (and spreads) of the numbers kvmckpt's
	// save reports about itself.
	KvmckptSave map[string]stat `json:"kvmckpt_save"`
	Failures    []string        `json:"failures,omitempty"`
}

// bench runs the measurements. Not safe for concurrent use.
type bench struct {
	cfg config
	// kvmckpt is the CLI's binary; self is this program's, for the
	// children.
	kvmckpt, self string
	// work holds the checkpoint files.
	work  string
	log   io.Writer
	start time.Time
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.log, "[%6.1fs] %s\n", time.Since(b.start).Seconds(), fmt.Sprintf(format, args...))
}

// Bounds on every wait, generous for TCG on a slow disk.
func opTimeout(memMiB int) time.Duration {
	return 2*time.Minute + time.Duration(memMiB)*50*time.Millisecond
}

func bootTimeout(memMiB int) time.Duration {
	return vmtest.BootTimeout + time.Duration(memMiB)*60*time.Millisecond
}

// verifyTimeout bounds the wait for the guest's next verification: a
// full interval, then a CRC of all kept data, slow under TCG.
func verifyTimeout(w workload) time.Duration {
	return time.Duration(w.IntervalS)*time.Second + 90*time.Second + time.Duration(w.MemMiB)*20*time.Millisecond
}

var (
	verifyRE = regexp.MustCompile(`KW VERIFY (OK|FAIL)[^\n]*`)
	readyRE  = regexp.MustCompile(`KW (READY|ERROR[^\n]*)`)
	// kernelTrouble matches console lines that mean a guest is not intact.
	kernelTrouble = regexp.MustCompile(`(?i)BUG:|Oops|bad page|corrupt|general protection|Kernel panic|VERIFY FAIL`)
)

// point boots one guest and measures repetitions first, first+1, ...,
// first+reps-1 on it (the number sets the order of the tools). The result
// holds what was measured even when an error ends the run early.
func (b *bench) point(ctx context.Context, w workload, first, reps int) (*pointResult, error) {
	res := &pointResult{Workload: w, KvmckptSave: map[string]stat{}}
	b.logf("boot %d MiB guest: churn %d MiB, keep %d+%d MiB, text %d MiB", w.MemMiB, w.ChurnMiB, w.AnonMiB, w.TmpfsMiB, w.TextMiB)
	t0 := time.Now()
	g, err := vmtest.Start(ctx, w.guest())
	if err != nil {
		return res, fmt.Errorf("boot guest: %w", err)
	}
	defer g.Close()
	m, _, err := g.WaitSerial(ctx, readyRE, 0, bootTimeout(w.MemMiB))
	if err != nil {
		return res, fmt.Errorf("boot guest: %w", err)
	}
	if m != "KW READY" {
		return res, fmt.Errorf("boot guest: workload failed: %s", m)
	}
	res.BootMS = ms(time.Since(t0))
	// The first kvmckpt run on a kernel finds (or builds and stores) the
	// kernel profile; a scan does that once, outside the measurements.
	pr, err := runProc(ctx, opTimeout(w.MemMiB), nil, b.kvmckpt, "scan", "--qmp", g.QMPPath, "--json")
	if err != nil {
		return res, fmt.Errorf("warm-up scan: %w", err)
	}
	res.WarmupMS = ms(pr.Wall)
	b.logf("guest ready in %.1f s; warm-up scan %.0f ms", res.BootMS/1000, res.WarmupMS)

	for rep := first; rep < first+reps; rep++ {
		if err := b.rep(ctx, g, w, rep, res); err != nil {
			res.Failures = append(res.Failures, err.Error())
			summarizePoint(res)
			return res, err
		}
	}
	if bad := kernelTrouble.FindString(g.Serial()); bad != "" {
		res.Failures = append(res.Failures, "source guest's console shows trouble: "+bad)
	}
	summarizePoint(res)
	if len(res.Failures) > 0 {
		return res, fmt.Errorf("%d failures, the first: %s", len(res.Failures), res.Failures[0])
	}
	return res, nil
}

// rep runs one repetition: the three saves of the running guest, the disk
// measurement, and the two restores.
func (b *bench) rep(ctx context.Context, g *vmtest.Guest, w workload, rep int, res *pointResult) error {
	dir, err := os.MkdirTemp(b.work, fmt.Sprintf("rep%d-", rep))
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	files := map[string][]string{}
	order := saveOrder(rep, b.cfg.mappedRAM())
	if b.cfg.RAM != "" {
		// No RAM file to copy.
		order = slices.DeleteFunc(order, func(t string) bool { return t == toolNaive })
	}
	for i, tool := range order {
		if err := b.settle(ctx, g, w); err != nil {
			return fmt.Errorf("rep %d, before %s save: %w", rep+1, tool, err)
		}
		m, fs, err := b.save(ctx, g, w, tool, dir)
		m.Rep, m.Position = rep, i+1
		if err != nil {
			if rerr := recoverGuest(ctx, g.QMPPath); rerr != nil {
				err = errors.Join(err, rerr)
			}
			return fmt.Errorf("rep %d: %s save: %w", rep+1, tool, err)
		}
		b.logf("rep %d: %-7s save: pause %6.0f ms, total %6.0f ms, %7.1f MiB", rep+1, tool, m.PauseMS, m.TotalMS, mib(m.Allocated))
		res.Measurements = append(res.Measurements, m)
		if tool == toolNaive {
			for _, f := range fs {
				os.Remove(f)
			}
		} else {
			files[tool] = fs
		}
	}

	// The disk alone, for kvmckpt's and for QEMU's byte counts, in the
	// same conditions. Both sizes, because a durable write has a fixed
	// cost (the journal commit) that a bandwidth from one size would
	// spread wrongly over the other; both through the page cache, as dd
	// does and as the tools do, and direct, which is the device's limit.
	for _, tool := range []string{toolKvmckpt, toolQEMU} {
		for _, mode := range []string{diskBuffered, diskDirect} {
			if err := b.settle(ctx, g, w); err != nil {
				return fmt.Errorf("rep %d, before the disk measurement: %w", rep+1, err)
			}
			n := last(res.Measurements, tool, opSave).Allocated
			n = max((n+(4<<20)-1)&^(4<<20-1), 16<<20)
			d, err := diskBandwidth(dir, n, mode)
			if err != nil {
				return fmt.Errorf("rep %d: %w", rep+1, err)
			}
			d.For, d.Rep = tool, rep
			res.DiskRuns = append(res.DiskRuns, d)
			b.logf("rep %d: disk %-8s %5.0f MiB (%s's size): write %5.0f ms + fdatasync %5.0f ms, %4.0f MiB/s",
				rep+1, mode, mib(d.Bytes), tool, d.WriteMS, d.SyncMS, d.MiBps())
		}
	}

	// The source guest is paused during the restores, so that its
	// verification rounds do not compete with them for the host's CPUs.
	if err := setRunning(ctx, g.QMPPath, false); err != nil {
		return fmt.Errorf("rep %d: pause source guest: %w", rep+1, err)
	}
	paused := true
	defer func() {
		if paused {
			setRunning(context.WithoutCancel(ctx), g.QMPPath, true)
		}
	}()
	for i, tool := range restoreOrder(rep, b.cfg.mappedRAM()) {
		if err := syncfs(b.work); err != nil {
			return err
		}
		if b.cfg.Cold {
			for _, f := range files[tool] {
				if err := evict(f); err != nil {
					return err
				}
			}
		}
		m, err := b.restore(ctx, w, tool, files[tool][0])
		m.Rep, m.Position = rep, i+1
		if err != nil {
			return fmt.Errorf("rep %d: %s restore: %w", rep+1, tool, err)
		}
		if !m.Verified {
			res.Failures = append(res.Failures, fmt.Sprintf("rep %d: %s restore: %s", rep+1, tool, m.Failure))
		}
		b.logf("rep %d: %-7s restore: %6.0f ms (%6.0f ms with QEMU start), verified %v", rep+1, tool, m.TotalMS, m.WithStartMS, m.Verified)
		res.Measurements = append(res.Measurements, m)
	}
	paused = false
	return setRunning(ctx, g.QMPPath, true)
}

// last returns the last measurement of tool's op.
func last(ms []measurement, tool, op string) measurement {
	for i := len(ms) - 1; i >= 0; i-- {
		if ms[i].Tool == tool && ms[i].Op == op {
			return ms[i]
		}
	}
	return measurement{}
}

// settle gives every save and disk measurement the same start: the
// filesystem's dirty data written out, then an idle gap until the guest's
// next verification round has ended. The gap matters on a virtual disk
// whose host absorbs bursts of writes in a cache (measured here: the same
// dd of 371 MiB with fdatasync took 0.3 s or 2.5 s from one run to the
// next).
func (b *bench) settle(ctx context.Context, g *vmtest.Guest, w workload) error {
	if err := syncfs(b.work); err != nil {
		return err
	}
	if err := waitVerified(ctx, g, w); err != nil {
		return fmt.Errorf("source guest: %w", err)
	}
	return nil
}

// waitVerified waits for the guest's next verification round to end, so
// that a save starts when the guest has a whole interval of sleep ahead:
// the guest is quiet during the measurement, and a restored copy prints
// its next verification one interval after it runs again. A failed
// verification is an error: some save broke the guest.
func waitVerified(ctx context.Context, g *vmtest.Guest, w workload) error {
	m, _, err := g.WaitSerial(ctx, verifyRE, len(g.Serial()), verifyTimeout(w))
	if err != nil {
		return err
	}
	if !strings.HasPrefix(m, "KW VERIFY OK") {
		return fmt.Errorf("workload reports %s", m)
	}
	return nil
}

// save runs one tool's save of the running guest into dir.
func (b *bench) save(ctx context.Context, g *vmtest.Guest, w workload, tool, dir string) (measurement, []string, error) {
	m := measurement{Tool: tool, Op: opSave, Load1: load1()}
	timeout := opTimeout(w.MemMiB)
	cpu0, err := readProcTimes(g.PID)
	if err != nil {
		return m, nil, err
	}
	var pr procResult
	var files []string
	switch tool {
	case toolQEMU, toolNaive, toolMappedRAM:
		spec := childSpec{Mode: modeQEMUSave, QMP: g.QMPPath, Output: filepath.Join(dir, "qemu.migration"), Timeout: timeout, Copier: b.cfg.Copier}
		switch tool {
		case toolNaive:
			spec.Mode, spec.Output = modeNaiveSave, filepath.Join(dir, "naive")
		case toolMappedRAM:
			spec.Mode, spec.Output = modeMappedRAMSave, filepath.Join(dir, "qemu.mapped-ram")
		}
		var cr childResult
		pr, err = b.child(ctx, spec, &cr)
		if err != nil {
			return m, nil, err
		}
		files = cr.Files
		m.PauseMS = cr.PauseMS
		m.Detail = map[string]float64{"stream_ms": cr.StreamMS, "sync_ms": cr.SyncMS, "stream_bytes": float64(cr.StreamBytes)}
		if tool == toolNaive {
			m.Detail["device_state_ms"] = cr.DeviceStateMS
		} else {
			m.Detail["x_ignore_shared_was_on"] = b2f(cr.IgnoreSharedWasOn)
			m.Detail["max_bandwidth_before"] = float64(cr.MaxBandwidthBefore)
		}
	case toolKvmckpt:
		out := filepath.Join(dir, "guest.kvmckpt")
		pr, err = runProc(ctx, timeout, nil, b.kvmckpt, "save", "--qmp", g.QMPPath, "-o", out, "--json")
		if err != nil {
			return m, nil, err
		}
		files = []string{out}
		if m.Detail, err = numbers(pr.Stdout); err != nil {
			return m, nil, fmt.Errorf("decode kvmckpt save output: %w", err)
		}
		m.PauseMS = m.Detail["pause_ms"]
	}
	cpu1, err := readProcTimes(g.PID)
	if err != nil {
		return m, files, err
	}
	m.TotalMS, m.ToolCPUMS, m.ToolMaxRSS = ms(pr.Wall), ms(pr.CPU), pr.MaxRSS
	m.QEMUCPUMS = ms(cpu1.Total() - cpu0.Total())
	size, err := sizeOf(files...)
	if err != nil {
		return m, files, err
	}
	m.Allocated, m.Apparent = size.Allocated, size.Apparent
	// Every tool must leave the guest running, as it found it.
	if running, state, err := isRunning(ctx, g.QMPPath); err != nil || !running {
		return m, files, fmt.Errorf("guest not running after the save (%s): %v", state, err)
	}
	return m, files, nil
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// child runs one of this program's child processes and decodes its result.
func (b *bench) child(ctx context.Context, spec childSpec, res *childResult) (procResult, error) {
	js, err := json.Marshal(spec)
	if err != nil {
		return procResult{}, err
	}
	pr, err := runProc(ctx, spec.Timeout+30*time.Second, []string{childEnv + "=" + string(js)}, b.self)
	if err != nil {
		return pr, err
	}
	if err := json.Unmarshal(pr.Stdout, res); err != nil {
		return pr, fmt.Errorf("decode %s result: %w", spec.Mode, err)
	}
	return pr, nil
}

// numbers decodes a JSON object and keeps its numeric fields.
func numbers(js []byte) (map[string]float64, error) {
	var all map[string]any
	if err := json.Unmarshal(js, &all); err != nil {
		return nil, err
	}
	out := map[string]float64{}
	for k, v := range all {
		if f, ok := v.(float64); ok {
			out[k] = f
		}
	}
	return out, nil
}

// bootReady boots a guest of cfg (memMiB of RAM) and waits until its
// workload is ready. The caller closes it.
func bootReady(ctx context.Context, cfg vmtest.Config, memMiB int) (*vmtest.Guest, error) {
	g, err := vmtest.Start(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("boot guest: %w", err)
	}
	if m, _, err := g.WaitSerial(ctx, readyRE, 0, bootTimeout(memMiB)); err != nil || m != "KW READY" {
		g.Close()
		return nil, fmt.Errorf("boot guest: %v %s", err, m)
	}
	return g, nil
}

// restorePaused restores out with b's kvmckpt into a new QEMU while the
// source guest g is paused (so that the two do not share the CPUs), and
// lets g run again. A restored guest that does not verify is an error.
func (b *bench) restorePaused(ctx context.Context, g *vmtest.Guest, w workload, out string) (measurement, error) {
	if err := setRunning(ctx, g.QMPPath, false); err != nil {
		return measurement{}, err
	}
	defer setRunning(context.WithoutCancel(ctx), g.QMPPath, true)
	m, err := b.restore(ctx, w, toolKvmckpt, out)
	if err != nil {
		return m, fmt.Errorf("restore: %w", err)
	}
	if !m.Verified {
		return m, fmt.Errorf("restored guest: %s", m.Failure)
	}
	return m, setRunning(ctx, g.QMPPath, true)
}

// restore starts a target QEMU like the source guest plus -incoming defer
// -S, restores file into it with tool, and checks that the restored guest
// verifies its data.
func (b *bench) restore(ctx context.Context, w workload, tool, file string) (measurement, error) {
	m := measurement{Tool: tool, Op: opRestore, Load1: load1()}
	cfg := w.guest()
	cfg.Incoming = true
	timeout := opTimeout(w.MemMiB)
	t0 := time.Now()
	tg, err := vmtest.Start(ctx, cfg)
	if err != nil {
		return m, fmt.Errorf("start target QEMU: %w", err)
	}
	defer tg.Close()
	cpu0, err := readProcTimes(tg.PID)
	if err != nil {
		return m, err
	}
	switch tool {
	case toolQEMU, toolMappedRAM:
		t1 := time.Now()
		if err := qemuLoad(ctx, tg, file, tool == toolMappedRAM, timeout); err != nil {
			return m, err
		}
		m.TotalMS = ms(time.Since(t1))
	case toolKvmckpt:
		pr, err := runProc(ctx, timeout, nil, b.kvmckpt, "restore", "-i", file, "--qmp", tg.QMPPath, "--resume", "--json")
		if err != nil {
			return m, err
		}
		m.TotalMS, m.ToolCPUMS, m.ToolMaxRSS = ms(pr.Wall), ms(pr.CPU), pr.MaxRSS
		if m.Detail, err = numbers(pr.Stdout); err != nil {
			return m, fmt.Errorf("decode kvmckpt restore output: %w", err)
		}
	}
	m.WithStartMS = ms(time.Since(t0))
	cpu1, err := readProcTimes(tg.PID)
	if err != nil {
		return m, err
	}
	m.QEMUCPUMS = ms(cpu1.Total() - cpu0.Total())
	if !strings.Contains(file, "://") { // an object has no blocks to count
		size, err := sizeOf(file)
		if err != nil {
			return m, err
		}
		m.Allocated, m.Apparent = size.Allocated, size.Apparent
	}
	m.Verified, m.Failure = verifyRestored(ctx, tg, w)
	return m, nil
}

// qemuLoad is QEMU's own restore: migrate-incoming from "exec:cat FILE"
// into a QEMU waiting with -incoming defer -S, then cont once the load
// completed. (On this side QEMU reads to the end of its stream before it
// closes the channel, so cat's early death, see [qemuSave], is harmless.)
//
// With mappedRAM the file is a mapped-ram one, which QEMU reads itself
// with the same capabilities and parameters as its save.
func qemuLoad(ctx context.Context, tg *vmtest.Guest, file string, mappedRAM bool, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	s, err := qmp.Dial(ctx, tg.QMPPath)
	if err != nil {
		return err
	}
	defer s.Close()
	uri := "exec:cat " + shellQuote(file)
	if mappedRAM {
		if err := setMappedRAM(ctx, s); err != nil {
			return err
		}
		uri = "file:" + file
	}
	if err := s.Run(ctx, "migrate-incoming", map[string]string{"uri": uri}, nil); err != nil {
		return fmt.Errorf("start incoming migration: %w", err)
	}
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		mig, err := s.MigrationStatus(ctx)
		if err != nil {
			if exited, why := tg.Exited(); exited {
				err = fmt.Errorf("%w (QEMU exited: %v)", err, why)
			}
			return err
		}
		switch mig.Status {
		case "failed", "cancelled":
			return fmt.Errorf("%w: %s %s", qmp.ErrMigrationFailed, mig.Status, mig.ErrorDesc)
		case "completed":
			st, err := s.Status(ctx)
			if err != nil {
				return err
			}
			if st.State != "inmigrate" {
				return s.Cont(ctx)
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for incoming migration: %w", ctx.Err())
		case <-tick.C:
		}
	}
}

// shellQuote quotes s for /bin/sh, which runs QEMU's exec: commands.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// verifyRestored waits for the restored guest's first verification of its
// kept data and checks its console for trouble.
func verifyRestored(ctx context.Context, tg *vmtest.Guest, w workload) (bool, string) {
	m, _, err := tg.WaitSerial(ctx, verifyRE, 0, verifyTimeout(w))
	if err != nil {
		return false, err.Error()
	}
	if !strings.HasPrefix(m, "KW VERIFY OK") {
		return false, m
	}
	if bad := kernelTrouble.FindString(tg.Serial()); bad != "" {
		return false, "console shows " + bad
	}
	return true, ""
}

// isRunning asks QEMU for the guest's run state.
func isRunning(ctx context.Context, sock string) (bool, string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	s, err := qmp.Dial(ctx, sock)
	if err != nil {
		return false, "", err
	}
	defer s.Close()
	st, err := s.Status(ctx)
	return st.Running, st.State, err
}

// setRunning stops or continues the guest.
func setRunning(ctx context.Context, sock string, run bool) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	s, err := qmp.Dial(ctx, sock)
	if err != nil {
		return err
	}
	defer s.Close()
	if run {
		return s.Cont(ctx)
	}
	return s.Stop(ctx)
}

// recoverGuest puts a guest back to running after a failed save: it
// cancels a migration still under way and continues the guest.
func recoverGuest(ctx context.Context, sock string) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 20*time.Second)
	defer cancel()
	s, err := qmp.Dial(ctx, sock)
	if err != nil {
		return fmt.Errorf("recover guest: %w", err)
	}
	defer s.Close()
	if mig, err := s.MigrationStatus(ctx); err == nil && (mig.Status == "active" || mig.Status == "setup" || mig.Status == "device") {
		_ = s.Run(ctx, "migrate_cancel", nil, nil)
		for mig.Status != "cancelled" && mig.Status != "failed" && mig.Status != "completed" && ctx.Err() == nil {
			time.Sleep(20 * time.Millisecond)
			if mig, err = s.MigrationStatus(ctx); err != nil {
				break
			}
		}
	}
	if err := s.Cont(ctx); err != nil {
		return fmt.Errorf("recover guest: %w", err)
	}
	return nil
}

// buildKvmckpt builds the CLI from the working tree into dir, so the
// numbers are those of the code at hand.
func buildKvmckpt(ctx context.Context, dir string) (string, error) {
	root, err := vmtest.ModuleRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, "kvmckpt")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./cmd/kvmckpt")
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build kvmckpt: %w: %s", err, tail(string(b), 10))
	}
	return out, nil
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }
