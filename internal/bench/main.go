// Command bench measures kvmckpt against QEMU's own save to a file (what
// `virsh save` does) and against a naive full copy of the guest's RAM
// file, side by side on one guest in one run, with the disk's durable
// write bandwidth as the physical limit.
//
//	go run ./internal/bench [-mem MiB] [-churn F] [-keep F] [-text F] [-reps N]
//	                        [-dir DIR] [-out FILE.json] [-png FILE.png]
//	                        [-sweep | -smoke] [-interval S] [-kvmckpt PATH]
//	                        [-live [-rates 0,10,50,200]]
//
// It boots one real guest (internal/vmtest) whose workload fills -churn of
// its RAM with random data and frees it, then keeps -keep of it
// incompressible and -text compressible. On that one guest state it runs
// -reps repetitions, each:
//
//   - three saves of the running guest, in alternating order, each started
//     just after the guest's verification round so the guest is idle:
//     QEMU's own save (stop, migrate with default capabilities at
//     unlimited bandwidth, fsync, cont), a naive save (stop, device state
//     with x-ignore-shared, sparse copy of the whole RAM file, fsync,
//     cont), and `kvmckpt save`; every tool runs as a process of its own,
//     so its CPU time and peak RSS come from its rusage, and QEMU's CPU
//     time from /proc/PID/stat;
//   - the disk alone writing kvmckpt's byte count durably;
//   - two restores into fresh QEMUs started with -incoming defer -S, from
//     files evicted from the page cache: QEMU's own (migrate-incoming from
//     the file, cont) and `kvmckpt restore --resume`; each restored guest
//     must then verify its kept data.
//
// It prints markdown tables on stdout, progress on stderr, and writes every
// measurement as JSON to -out. -sweep measures guests of 1, 2 and 4 GiB
// with 0, 30, 60 and 90% of RAM freed (at most RAM-224 MiB, which the
// guest needs to churn), one repetition each; -smoke is a 512 MiB guest,
// one repetition, for the test suite.
//
// Every QEMU it starts is closed on every path; checkpoint files live in a
// temporary directory under -dir, removed at the end.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
)

func main() {
	if isChild, code := childMain(); isChild {
		os.Exit(code)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	_, err := run(ctx, os.Stdout, os.Stderr, os.Args[1:])
	stop()
	if left := vmtest.Leftovers(); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "bench: left behind: %v\n", left)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		os.Exit(1)
	}
}

// config is the command line.
type config struct {
	MemMiB   int     `json:"mem_mib"`
	Churn    float64 `json:"churn"`
	Keep     float64 `json:"keep"`
	Text     float64 `json:"text"`
	Reps     int     `json:"reps"`
	Dir      string  `json:"dir"`
	Out      string  `json:"out"`
	PNG      string  `json:"png,omitempty"`
	Sweep    bool    `json:"sweep"`
	Smoke    bool    `json:"smoke"`
	Kvmckpt  string  `json:"kvmckpt,omitempty"`
	Interval int     `json:"interval_s"`
	CPUs     int     `json:"cpus"`
	Machine  string  `json:"machine"`
	Cold     bool    `json:"cold_restore"`
	Copier   string  `json:"copier"`
	// QEMU is the emulator the guest runs under (vmtest.Config.QEMU).
	QEMU string `json:"qemu,omitempty"`
	// Live measures live saves of guests that keep writing memory
	// instead (live.go).
	Live bool `json:"live,omitempty"`
	// Squeeze measures saves of a guest with a page cache, with and
	// without --squeeze (squeeze.go).
	Squeeze bool `json:"squeeze,omitempty"`
	// Incremental measures incremental saves against whole ones
	// (incremental.go).
	Incremental bool `json:"incremental,omitempty"`
	// Rates are the live bench's writer rates, MiB/s (0: idle).
	Rates []int `json:"rates,omitempty"`
	// RAM is the guest's kind of RAM (vmtest.Config.RAM): "" a shared
	// file, "default" QEMU's own anonymous RAM, which has no file for
	// the naive copy.
	RAM string `json:"ram,omitempty"`
	// Limit runs the stop-and-copy limit bench (limit.go); Old is the
	// older kvmckpt binary it compares with.
	Limit bool   `json:"limit,omitempty"`
	Old   string `json:"old,omitempty"`
	// S3 runs the object storage bench (s3.go); S3URL is a bucket of a
	// store of the user's (s3://BUCKET/PREFIX, reached as kvmckpt reaches
	// one) instead of the local SeaweedFS it starts.
	S3    bool   `json:"s3,omitempty"`
	S3URL string `json:"s3_url,omitempty"`
}

// mappedRAM reports whether the emulator has mapped-ram (QEMU 8.2 and
// later: the backported one, not bookworm's 7.2).
func (c config) mappedRAM() bool { return c.QEMU != "" }

// Sweep points.
var (
	sweepMemMiB = []int{1024, 2048, 4096}
	sweepFreed  = []float64{0, 0.3, 0.6, 0.9}
)

func parseFlags(args []string, stderr io.Writer) (config, error) {
	var c config
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.IntVar(&c.MemMiB, "mem", 2048, "guest RAM, MiB")
	fs.Float64Var(&c.Churn, "churn", 0.6, "fraction of RAM filled with non-zero data and freed")
	fs.Float64Var(&c.Keep, "keep", 0.10, "fraction of RAM kept incompressible (half anonymous, half tmpfs)")
	fs.Float64Var(&c.Text, "text", 0.10, "fraction of RAM kept compressible")
	fs.IntVar(&c.Reps, "reps", 3, "repetitions")
	fs.StringVar(&c.Dir, "dir", "/var/tmp", "directory for checkpoint files (a temporary directory is made inside; use a disk, not tmpfs)")
	fs.StringVar(&c.Out, "out", "bench-results/bench.json", "JSON results (bench-results/sweep.json with -sweep)")
	fs.StringVar(&c.PNG, "png", "", "also draw a bar chart into this PNG file")
	fs.BoolVar(&c.Sweep, "sweep", false, "RAM 1, 2, 4 GiB × 0, 30, 60, 90% freed, one repetition each")
	fs.BoolVar(&c.Smoke, "smoke", false, "quick run for the tests: 512 MiB guest, one repetition")
	fs.StringVar(&c.Kvmckpt, "kvmckpt", "", "kvmckpt binary (default: build ./cmd/kvmckpt)")
	fs.IntVar(&c.Interval, "interval", 5, "guest's verification period, s (saves start just after a round)")
	fs.IntVar(&c.CPUs, "cpus", 1, "guest vCPUs")
	fs.StringVar(&c.Machine, "machine", "pc", "QEMU machine type: pc or q35")
	fs.BoolVar(&c.Cold, "cold", true, "evict checkpoint files from the page cache before each restore")
	fs.StringVar(&c.QEMU, "qemu", "", "emulator: empty for the system's (bookworm's 7.2), 10.0 for the one make deps unpacked (adds QEMU's mapped-ram save)")
	fs.StringVar(&c.Copier, "copier", copierWrite, "how QEMU's save stream reaches the file: write (read/write(2), as when QEMU writes the file itself) or splice")
	fs.BoolVar(&c.Live, "live", false, "live saves instead: guests writing memory at 0, 10, 50 and 200 MiB/s (50 with -smoke), each saved by kvmckpt with and without --live and by QEMU's live migration")
	fs.StringVar(&c.RAM, "ram", "", "guest RAM: empty for a shared file (memory-backend-file share=on), default for QEMU's own anonymous RAM (-m alone; no naive copy then)")
	fs.BoolVar(&c.Squeeze, "squeeze", false, "a guest with a balloon that read half its RAM of files, saved with and without --squeeze and by QEMU's own save")
	fs.BoolVar(&c.Incremental, "incremental", false, "a quiet guest with half its RAM of data, 1, 10 and 50% of its pages in use rewritten, saved incrementally (--parent) and whole")
	fs.BoolVar(&c.Limit, "limit", false, "stop-and-copy saves of the default guest, each followed by the disk's and memory's bandwidth; with -old, by an older kvmckpt too, alternated")
	fs.StringVar(&c.Old, "old", "", "with -limit: an older kvmckpt binary to compare with")
	fs.StringVar(&c.S3URL, "s3-url", "", "with -s3: save to s3://BUCKET/PREFIX of a store of yours (AWS_* variables and files, AWS_ENDPOINT_URL_S3) instead of a local SeaweedFS")
	fs.BoolVar(&c.S3, "s3", false, "stop-and-copy saves of the default guest to a local file and to a local S3 store (SeaweedFS), alternated, each restored from where it was saved")
	rates := fs.String("rates", "", "with -live: the writer rates, MiB/s, comma-separated (0: idle; default 0,10,50,200, or 50 with -smoke)")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if *rates != "" {
		for _, f := range strings.Split(*rates, ",") {
			r, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || r < 0 {
				return c, fmt.Errorf("-rates %q: comma-separated MiB/s, 0 or more", *rates)
			}
			c.Rates = append(c.Rates, r)
		}
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if c.Smoke {
		if c.Sweep {
			return c, errors.New("-smoke and -sweep exclude each other")
		}
		if !set["mem"] {
			c.MemMiB = 512
		}
		if !set["reps"] {
			c.Reps = 1
		}
		if !set["interval"] {
			c.Interval = 3
		}
	}
	if c.Sweep && !set["out"] {
		c.Out = "bench-results/sweep.json"
	}
	if c.Live {
		if c.Sweep {
			return c, errors.New("-live and -sweep exclude each other")
		}
		if !set["out"] {
			c.Out = "bench-results/live.json"
		}
		if !set["reps"] {
			c.Reps = 1
		}
	}
	if c.Squeeze {
		if c.Live || c.Sweep {
			return c, errors.New("-squeeze excludes -live and -sweep")
		}
		if !set["out"] {
			c.Out = "bench-results/squeeze.json"
		}
		if !set["reps"] {
			c.Reps = 1
		}
	}
	if c.Incremental {
		if c.Live || c.Sweep || c.Squeeze {
			return c, errors.New("-incremental excludes -live, -sweep and -squeeze")
		}
		if !set["out"] {
			c.Out = "bench-results/incremental.json"
		}
		if !set["reps"] {
			c.Reps = 1
		}
	}
	if c.Limit {
		if c.Live || c.Sweep || c.Squeeze || c.Incremental {
			return c, errors.New("-limit excludes -live, -sweep, -squeeze and -incremental")
		}
		if !set["out"] {
			c.Out = "bench-results/limit.json"
		}
		if !set["reps"] {
			c.Reps = 5
		}
	}
	if c.S3 {
		if c.Live || c.Sweep || c.Squeeze || c.Incremental || c.Limit {
			return c, errors.New("-s3 excludes -live, -sweep, -squeeze, -incremental and -limit")
		}
		if !set["out"] {
			c.Out = "bench-results/s3.json"
		}
		if !set["reps"] {
			c.Reps = 3
		}
	}
	if set["s3-url"] && !c.S3 {
		return c, errors.New("-s3-url needs -s3")
	}
	if set["old"] && !c.Limit {
		return c, errors.New("-old needs -limit")
	}
	if set["rates"] && !c.Live {
		return c, errors.New("-rates needs -live")
	}
	switch {
	case c.MemMiB < 256:
		return c, fmt.Errorf("-mem %d: at least 256 MiB", c.MemMiB)
	case c.Reps < 1:
		return c, fmt.Errorf("-reps %d: at least 1", c.Reps)
	case c.Interval < 1:
		return c, fmt.Errorf("-interval %d: at least 1 s", c.Interval)
	case c.CPUs < 1:
		return c, fmt.Errorf("-cpus %d: at least 1", c.CPUs)
	case c.RAM != "" && c.RAM != "default":
		return c, fmt.Errorf("-ram %q: empty or default", c.RAM)
	case c.RAM != "" && (c.Live || c.Sweep):
		return c, errors.New("-ram default goes with the stop-and-copy bench only")
	case c.Machine != "pc" && c.Machine != "q35":
		return c, fmt.Errorf("-machine %q: pc or q35", c.Machine)
	case c.Copier != copierWrite && c.Copier != copierSplice:
		return c, fmt.Errorf("-copier %q: write or splice", c.Copier)
	case c.Churn < 0 || c.Keep < 0 || c.Text < 0 || c.Churn > 1 || c.Keep+c.Text > 0.5:
		return c, fmt.Errorf("-churn %g must be in [0, 1] and -keep %g + -text %g at most 0.5", c.Churn, c.Keep, c.Text)
	}
	return c, nil
}

// run parses args, measures, prints the tables to stdout and writes the
// results. It returns the report even when the run failed part way.
func run(ctx context.Context, stdout, stderr io.Writer, args []string) (*report, error) {
	cfg, err := parseFlags(args, stderr)
	if err != nil {
		return nil, err
	}
	b := &bench{cfg: cfg, log: stderr, start: time.Now()}
	if b.self, err = os.Executable(); err != nil {
		return nil, err
	}
	if b.work, err = os.MkdirTemp(cfg.Dir, "kvmckpt-bench-"); err != nil {
		return nil, fmt.Errorf("make work directory: %w", err)
	}
	defer os.RemoveAll(b.work)
	if cfg.Kvmckpt != "" {
		if b.kvmckpt, err = filepath.Abs(cfg.Kvmckpt); err != nil {
			return nil, err
		}
	} else {
		bin := filepath.Join(b.work, "bin")
		if err := os.Mkdir(bin, 0o755); err != nil {
			return nil, err
		}
		if b.kvmckpt, err = buildKvmckpt(ctx, bin); err != nil {
			return nil, err
		}
		b.logf("built %s", b.kvmckpt)
	}
	r := &report{
		Generated: time.Now().UTC(),
		Command:   strings.TrimSpace("go run ./internal/bench " + strings.Join(args, " ")),
		Machine:   probeMachine(ctx, b.work, cfg.QEMU),
		Config:    cfg,
	}
	if r.Machine.Disk.FSType == "tmpfs" {
		b.logf("warning: %s is on tmpfs: the disk limit is memory's", b.work)
	}

	var runErr error
	switch {
	case cfg.Live:
		runErr = b.live(ctx, r)
	case cfg.Squeeze:
		runErr = b.squeeze(ctx, r)
	case cfg.Incremental:
		runErr = b.incremental(ctx, r)
	case cfg.Limit:
		runErr = b.limit(ctx, r)
	case cfg.S3:
		runErr = b.s3(ctx, r)
	case cfg.Sweep:
		runErr = b.sweep(ctx, r)
	default:
		w := newWorkload(cfg, cfg.MemMiB, cfg.Churn)
		r.Result, runErr = b.point(ctx, w, 0, cfg.Reps)
	}
	if runErr != nil {
		r.Error = runErr.Error()
	}
	writeMarkdown(stdout, r)
	if err := writeJSON(cfg.Out, r); err != nil {
		return r, errors.Join(runErr, err)
	}
	b.logf("results in %s", cfg.Out)
	if cfg.PNG != "" && r.Result != nil {
		title := fmt.Sprintf("kvmckpt vs QEMU's own save: %d MiB guest, %d%% freed, %s, %d cores",
			r.Result.Workload.MemMiB, 100*r.Result.Workload.ChurnMiB/r.Result.Workload.MemMiB, r.Machine.Accel, r.Machine.Cores)
		if err := writePNG(cfg.PNG, r.Result, title); err != nil {
			return r, errors.Join(runErr, err)
		}
		b.logf("chart in %s", cfg.PNG)
	}
	return r, runErr
}

// sweep measures every sweep point on a guest of its own. A failed point
// is recorded and the sweep goes on, unless ctx ended.
func (b *bench) sweep(ctx context.Context, r *report) error {
	var failed []string
	for _, mem := range sweepMemMiB {
		for _, freed := range sweepFreed {
			w := newWorkload(b.cfg, mem, freed)
			// One repetition per point; the order of the tools
			// alternates from point to point, so that no tool is
			// always the first to save a freshly booted guest.
			p, err := b.point(ctx, w, len(r.Sweep), 1)
			if err != nil {
				if len(p.Failures) == 0 {
					p.Failures = append(p.Failures, err.Error())
				}
				failed = append(failed, fmt.Sprintf("%d MiB, %.0f%% freed: %v", mem, 100*freed, err))
				b.logf("sweep point failed: %v", err)
			}
			r.Sweep = append(r.Sweep, p)
			if ctx.Err() != nil {
				return ctx.Err()
			}
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d sweep points failed: %s", len(failed), strings.Join(failed, "; "))
	}
	return nil
}
