package checkpoint

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/kvmckpt/kvmckpt/introspect"
	"github.com/kvmckpt/kvmckpt/ramblock"
	"github.com/kvmckpt/kvmckpt/writer"
)

// PSOptions say which guest's tasks to list.
type PSOptions struct {
	ScanOptions
	// Threads lists every thread, not only processes.
	Threads bool
}

// Process is a task with its command line.
type Process struct {
	introspect.Task
	// Cmdline is the process's arguments, read from its memory; empty for
	// kernel threads. CmdlineTruncated says part of them was not in guest
	// RAM (swapped out) or past 128 KiB.
	Cmdline          []string `json:"cmdline"`
	CmdlineTruncated bool     `json:"cmdline_truncated,omitempty"`
}

// PSResult is a guest's task list. The JSON names are part of the CLI.
type PSResult struct {
	Tasks        []Process `json:"tasks"`
	KernelBanner string    `json:"kernel_banner"`
	Profile      string    `json:"profile"`
	// PauseMS is how long the guest was paused for the read.
	PauseMS    int64 `json:"pause_ms"`
	DurationMS int64 `json:"duration_ms"`
}

// PS lists a guest's tasks as its kernel has them, with nothing in the
// guest: it pauses a running guest only while it reads the task list and
// the command lines, then puts it back in its run state. A kernel whose
// task structures kvmckpt cannot read with proof gives an error, never a
// guessed list.
func PS(ctx context.Context, opt PSOptions) (*PSResult, error) {
	start := time.Now()
	var res *PSResult
	pause, err := whilePaused(ctx, opt.target(), opt.Log, func(g *guest) error {
		var err error
		res, err = g.ps(ctx, opt)
		return err
	})
	if err != nil {
		return nil, err
	}
	res.PauseMS = pause.Milliseconds()
	res.DurationMS = time.Since(start).Milliseconds()
	return res, nil
}

// whilePaused opens the guest, maps its RAM (before the pause: finding
// it does not need one), pauses it, runs fn, and puts the guest back in
// the run state it had, whatever fn did and even if ctx ended. It returns
// how long the guest was paused. A guest waiting for an incoming
// migration is refused.
func whilePaused(ctx context.Context, t Target, log *slog.Logger, fn func(*guest) error) (time.Duration, error) {
	g, err := openGuest(ctx, t, logger(log))
	if err != nil {
		return 0, err
	}
	defer g.close()
	if g.prior.State == "inmigrate" {
		return 0, fmt.Errorf("%w: %w", ErrGuestState, g.prior.CheckSaveable())
	}
	if err := g.mapRAM(ctx, false); err != nil {
		return 0, err
	}
	restore, err := g.pause(ctx)
	if err != nil {
		return 0, err
	}
	paused := time.Now()
	fnErr := fn(g)
	pause := time.Since(paused)
	sctx, cancel := settleContext(ctx)
	rerr := restore(sctx)
	cancel()
	switch {
	case fnErr != nil && rerr != nil:
		return 0, fmt.Errorf("%w (and: %v)", fnErr, rerr)
	case fnErr != nil:
		return 0, fnErr
	case rerr != nil:
		return 0, rerr
	}
	return pause, nil
}

func (g *guest) ps(ctx context.Context, opt PSOptions) (*PSResult, error) {
	regs, err := g.sess.CPURegisters(ctx, 0)
	if err != nil {
		return nil, err
	}
	so := opt.ScanOptions
	so.needTasks = true
	prof, err := g.profile(ctx, so, regs)
	if err != nil {
		return nil, err
	}
	k, err := introspect.OpenKernel(g.mem, regs.CR3, regs.LA57(), prof)
	if err != nil {
		return nil, err
	}
	return listTasks(ctx, k, opt.Threads)
}

// listTasks reads the tasks and their command lines.
func listTasks(ctx context.Context, k *introspect.Kernel, threads bool) (*PSResult, error) {
	tasks, err := k.Tasks(ctx, introspect.TaskOptions{Threads: threads})
	if err != nil {
		return nil, err
	}
	prof := k.Profile
	res := &PSResult{Profile: prof.Name, KernelBanner: prof.Banner, Tasks: make([]Process, 0, len(tasks))}
	for _, t := range tasks {
		p := Process{Task: t}
		if p.Cmdline, p.CmdlineTruncated, err = k.Cmdline(t); err != nil {
			return nil, err
		}
		res.Tasks = append(res.Tasks, p)
	}
	return res, nil
}

// PSFile lists the tasks of the guest saved in a checkpoint file, reading
// the file as guest memory (ramblock.Checkpoint): pages the checkpoint
// does not hold are absent, so a task list or command line that runs
// through one fails (or is cut short) rather than being guessed.
// opt.QMP and opt.Domain are unused.
func PSFile(ctx context.Context, path string, key []byte, opt PSOptions) (*PSResult, error) {
	start := time.Now()
	var res *PSResult
	err := withFileKernel(path, key, opt.ScanOptions, func(k *introspect.Kernel, _ *writer.Header) error {
		var err error
		res, err = listTasks(ctx, k, opt.Threads)
		return err
	})
	if err != nil {
		return nil, err
	}
	res.DurationMS = time.Since(start).Milliseconds()
	return res, nil
}

// withFileKernel opens the checkpoint file at path as guest memory and
// calls fn with the guest kernel found in it. An error names the
// checkpoint's own fault, if it has one, beside the kernel's.
func withFileKernel(path string, key []byte, opt ScanOptions, fn func(*introspect.Kernel, *writer.Header) error) error {
	r, err := openWhole(path, key, "reading processes from a file")
	if err != nil {
		return err
	}
	defer r.Close()
	h := r.Header()
	if h.KernelPGD == 0 {
		return fmt.Errorf("%w: the checkpoint does not say where the guest kernel's page tables are (saved by an older kvmckpt, or of a guest whose kernel it could not read): reading a process from a file needs one saved by this kvmckpt", ErrNoIntrospection)
	}
	c, err := ramblock.OpenCheckpoint(r)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	defer c.Close()
	regions := c.Regions()
	backends := make([]introspect.Backend, len(regions))
	var maps []introspect.Mapping
	for i, reg := range regions {
		backends[i] = reg
		for _, m := range h.Regions[i].Mappings {
			maps = append(maps, introspect.Mapping{GPA: introspect.PAddr(m.GPA), Backend: i, Offset: m.Offset, Size: m.Size})
		}
	}
	mem, err := introspect.NewPhysMemOf(backends, maps)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	opt.needTasks = true
	absent := func(err error) error {
		if cerr := c.Err(); err != nil && cerr != nil {
			return fmt.Errorf("%w (the checkpoint: %w)", err, cerr)
		}
		return err
	}
	prof, err := findProfile(mem, introspect.PAddr(h.KernelPGD), h.LA57, opt, logger(opt.Log))
	if err != nil {
		return absent(err)
	}
	k, err := introspect.OpenKernel(mem, h.KernelPGD, h.LA57, prof)
	if err != nil {
		return absent(err)
	}
	return absent(fn(k, &h))
}
