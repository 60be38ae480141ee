package checkpoint

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/kvmckpt/kvmckpt/elfcore"
	"github.com/kvmckpt/kvmckpt/internal/safefile"
	"github.com/kvmckpt/kvmckpt/introspect"
	"github.com/kvmckpt/kvmckpt/qmp"
	"github.com/kvmckpt/kvmckpt/writer"
)

// ErrNoProcess means the guest has no user process with the id asked for.
var ErrNoProcess = errors.New("no such guest process")

// CoreOptions say which guest process to write a core of, and where.
type CoreOptions struct {
	ScanOptions
	// PID is the process's id (its TGID) in the guest's initial pid
	// namespace, as `kvmckpt ps` lists it.
	PID int32
	// Output is the core file's path; it is written whole or not at all.
	Output string
}

// CoreThread is one thread written to a core.
type CoreThread struct {
	TID   int32  `json:"tid"`
	Comm  string `json:"comm"`
	State string `json:"state"`
	// Registers says where its registers came from: "vcpu" (it was
	// running in user mode, CPU gives the vCPU) or "kernel stack" (saved
	// by its kernel on entry).
	Registers string `json:"registers"`
	CPU       int    `json:"cpu"`
}

// CoreResult describes a core written. The JSON names are part of the CLI.
type CoreResult struct {
	Output  string       `json:"output"`
	PID     int32        `json:"pid"`
	Comm    string       `json:"comm"`
	Cmdline []string     `json:"cmdline"`
	Threads []CoreThread `json:"threads"`
	// Areas is the process's memory areas (VMAs); SkippedAreas those
	// left without bytes because the kernel's own core dumps leave them
	// (VM_IO, VM_DONTDUMP).
	Areas        int `json:"areas"`
	SkippedAreas int `json:"skipped_areas"`
	// PresentBytes is the memory written; AbsentBytes the rest of the
	// areas, whose pages guest RAM did not hold (never touched, swapped
	// out, not in the checkpoint) or which are skipped: left out of the
	// core, never written as zeros.
	PresentBytes uint64 `json:"present_bytes"`
	AbsentBytes  uint64 `json:"absent_bytes"`
	Bytes        int64  `json:"bytes"`
	KernelBanner string `json:"kernel_banner"`
	Profile      string `json:"profile"`
	// PauseMS is how long the guest was paused (0 for a checkpoint file):
	// it stays paused while the core is written.
	PauseMS    int64 `json:"pause_ms"`
	DurationMS int64 `json:"duration_ms"`
}

// Core writes an ELF core file of one process of a running or paused
// guest, read from outside with nothing in the guest: the guest is paused
// while the core is read and written, then put back in its run state. A
// kernel kvmckpt cannot read with proof gives an error and no file.
func Core(ctx context.Context, opt CoreOptions) (*CoreResult, error) {
	start := time.Now()
	if opt.Output == "" {
		return nil, errors.New("core: no output file given")
	}
	var res *CoreResult
	pause, err := whilePaused(ctx, opt.target(), opt.Log, func(g *guest) error {
		var err error
		res, err = g.core(ctx, opt)
		return err
	})
	if err != nil {
		return nil, err
	}
	res.PauseMS = pause.Milliseconds()
	res.DurationMS = time.Since(start).Milliseconds()
	return res, nil
}

func (g *guest) core(ctx context.Context, opt CoreOptions) (*CoreResult, error) {
	regs, err := g.cpuRegisters(ctx)
	if err != nil {
		return nil, err
	}
	so := opt.ScanOptions
	so.needTasks = true
	prof, err := g.profile(ctx, so, regs[0])
	if err != nil {
		return nil, err
	}
	k, err := introspect.OpenKernel(g.mem, regs[0].CR3, regs[0].LA57(), prof)
	if err != nil {
		return nil, err
	}
	cpus := make(map[int]writer.CPU, len(regs))
	for _, r := range regs {
		if r.HasGPR {
			cpus[r.CPU] = cpuState(r)
		}
	}
	return writeCore(ctx, k, cpus, opt)
}

// CoreFile writes a core of one process of the guest saved in a
// checkpoint file, read as guest memory: pages the checkpoint does not
// hold are absent from the core. opt.QMP and opt.Domain are unused.
func CoreFile(ctx context.Context, path string, key []byte, opt CoreOptions) (*CoreResult, error) {
	start := time.Now()
	if opt.Output == "" {
		return nil, errors.New("core: no output file given")
	}
	var res *CoreResult
	err := withFileKernel(path, key, opt.ScanOptions, func(k *introspect.Kernel, h *writer.Header) error {
		cpus := make(map[int]writer.CPU, len(h.CPUs))
		for _, c := range h.CPUs {
			cpus[c.Index] = c
		}
		var err error
		res, err = writeCore(ctx, k, cpus, opt)
		return err
	})
	if err != nil {
		return nil, err
	}
	res.DurationMS = time.Since(start).Milliseconds()
	return res, nil
}

// VM_ flags (include/linux/mm.h), macros: checked by what they imply on
// every core (a thread's instruction pointer is in an executable area,
// its stack pointer in a writable one).
const (
	vmRead     = 0x1
	vmWrite    = 0x2
	vmExec     = 0x4
	vmIO       = 0x4000
	vmDontDump = 0x04000000
)

// userCS64 and userDS are x86-64 Linux's user selectors (__USER_CS,
// __USER_DS: GDT entries 6 and 5 with RPL 3), for a thread whose vCPU
// state lacks them.
const (
	userCS64 = 0x33
	userDS   = 0x2b
)

// writeCore finds the process opt.PID in k, reads its threads' registers
// (from cpus for a thread running in user mode), its memory areas and
// present pages, and writes the core.
func writeCore(ctx context.Context, k *introspect.Kernel, cpus map[int]writer.CPU, opt CoreOptions) (*CoreResult, error) {
	tasks, err := k.Tasks(ctx, introspect.TaskOptions{Threads: true})
	if err != nil {
		return nil, err
	}
	var threads []introspect.Task
	var leader *introspect.Task
	for i, t := range tasks {
		if t.TGID != opt.PID {
			continue
		}
		threads = append(threads, t)
		if t.PID == t.TGID {
			leader = &tasks[i]
		}
	}
	switch {
	case leader == nil:
		return nil, fmt.Errorf("%w: the guest has no process %d (`kvmckpt ps` lists them)", ErrNoProcess, opt.PID)
	case leader.KernelThread || leader.MM == 0:
		return nil, fmt.Errorf("%w: process %d (%s) is a kernel thread or has exited: it has no user memory to write", ErrNoProcess, opt.PID, leader.Comm)
	}
	running, err := k.RunningTasks()
	if err != nil {
		return nil, err
	}
	onCPU := make(map[introspect.VAddr]int, len(running))
	for cpu, task := range running {
		onCPU[task] = cpu
	}
	mem, err := k.UserMemory(*leader)
	if err != nil {
		return nil, err
	}

	res := &CoreResult{Output: opt.Output, PID: opt.PID, Comm: leader.Comm,
		KernelBanner: k.Profile.Banner, Profile: k.Profile.Name}
	c := &elfcore.Core{}
	first := -1
	for _, t := range threads {
		if t.MM != leader.MM {
			return nil, fmt.Errorf("%w: thread %d of process %d has another mm", introspect.ErrKernel, t.PID, opt.PID)
		}
		ct := CoreThread{TID: t.PID, Comm: t.Comm, State: t.State, Registers: "kernel stack", CPU: -1}
		regs, err := k.SavedUserRegs(t)
		cpu, running := onCPU[t.Addr]
		if running {
			ct.CPU = cpu
			v, have := cpus[cpu]
			switch {
			case have && v.CPL == 3:
				if err := checkCR3(v, mem.Root()); err != nil {
					return nil, fmt.Errorf("%w: thread %d runs on vCPU %d: %w", introspect.ErrKernel, t.PID, cpu, err)
				}
				regs, err = vcpuRegs(v), nil
				ct.Registers = "vcpu"
			case !have:
				return nil, fmt.Errorf("%w: thread %d was running on vCPU %d when the guest paused, and the vCPU's registers are not at hand (a checkpoint from a live save or an older kvmckpt does not keep them): take the core from the running guest", ErrNoIntrospection, t.PID, cpu)
			case err == nil:
				// In the kernel: its user registers are on its stack, and
				// the user's FS base is still in the vCPU (the kernel does
				// not use FS).
				regs.FSBase = v.FSBase
			}
		}
		if err != nil {
			return nil, err
		}
		if running && first < 0 {
			first = len(c.Threads)
		}
		c.Threads = append(c.Threads, elfcore.Thread{PID: t.PID, Regs: elfcore.Regs(regs)})
		res.Threads = append(res.Threads, ct)
	}
	// The thread that was running first, else the leader (first on its
	// group's list when it is alive).
	if first < 0 {
		for i, t := range threads {
			if t.PID == t.TGID {
				first = i
			}
		}
	}
	c.Threads[0], c.Threads[first] = c.Threads[first], c.Threads[0]
	res.Threads[0], res.Threads[first] = res.Threads[first], res.Threads[0]

	ids, err := k.ProcessIDs(*leader)
	if err != nil {
		return nil, err
	}
	args, _, err := k.Cmdline(*leader)
	if err != nil {
		return nil, err
	}
	res.Cmdline = args
	c.Process = elfcore.Process{PID: leader.TGID, PPID: leader.PPID, PGRP: ids.PGRP, SID: ids.SID,
		UID: leader.UID, GID: ids.GID, State: leader.State[0], Name: leader.Comm, Args: strings.Join(args, " ")}
	if c.Auxv, err = k.Auxv(*leader); err != nil {
		return nil, err
	}

	vmas, err := k.VMAs(leader.MM)
	if err != nil {
		return nil, err
	}
	res.Areas = len(vmas)
	if err := checkVMFlags(vmas, c.Threads); err != nil {
		return nil, err
	}
	vdso, image, err := k.VDSO(*leader)
	if err != nil {
		return nil, err
	}
	for _, v := range vmas {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		var flags uint32
		if v.Flags&vmRead != 0 {
			flags |= elfcore.FlagR
		}
		if v.Flags&vmWrite != 0 {
			flags |= elfcore.FlagW
		}
		if v.Flags&vmExec != 0 {
			flags |= elfcore.FlagX
		}
		if v.File != 0 {
			path, err := k.FilePath(v.File)
			if err != nil {
				return nil, err
			}
			c.Files = append(c.Files, elfcore.File{Start: v.Start, End: v.End, PgOff: v.PgOff, Path: path})
		}
		// Memory without bytes in the core is in no segment: a reader
		// then says it cannot be read (or, for a file's pages, reads the
		// file), where a segment without bytes would read as zeros.
		size := v.End - v.Start
		switch {
		case v.Flags&(vmIO|vmDontDump) != 0:
			res.SkippedAreas++
			res.AbsentBytes += size
			continue
		case vdso != 0 && v.Start == vdso:
			if size != uint64(len(image)) {
				return nil, fmt.Errorf("%w: the vDSO area is %d bytes, its image %d", introspect.ErrKernel, size, len(image))
			}
			res.PresentBytes += size
			c.Segments = append(c.Segments, elfcore.Segment{Addr: v.Start, Size: size, Flags: flags})
			continue
		}
		runs, err := mem.Present(v.Start, v.End)
		if err != nil {
			return nil, fmt.Errorf("%w: pages of [%#x, %#x): %w", introspect.ErrKernel, v.Start, v.End, err)
		}
		res.AbsentBytes += size
		for _, r := range runs {
			c.Segments = append(c.Segments, elfcore.Segment{Addr: uint64(r.Start), Size: r.Length(), Flags: flags})
			res.PresentBytes += r.Length()
			res.AbsentBytes -= r.Length()
		}
	}

	src := &coreMemory{ctx: ctx, mem: mem, vdso: vdso, image: image}
	err = safefile.Write(opt.Output, 0o600, func(w io.Writer) error {
		n, err := elfcore.Write(w, c, src)
		res.Bytes = n
		return err
	})
	if err != nil {
		return nil, err
	}
	return res, nil
}

// vcpuRegs are the user registers of a thread running in user mode.
func vcpuRegs(v writer.CPU) introspect.UserRegs {
	g := v.GPR
	r := introspect.UserRegs{
		AX: g[0], CX: g[1], DX: g[2], BX: g[3], SP: g[4], BP: g[5], SI: g[6], DI: g[7],
		R8: g[8], R9: g[9], R10: g[10], R11: g[11], R12: g[12], R13: g[13], R14: g[14], R15: g[15],
		IP: v.RIP, Flags: v.RFLAGS, OrigAX: ^uint64(0), // not in a system call
		ES: uint64(v.Selectors[qmp.SegES]), CS: uint64(v.Selectors[qmp.SegCS]), SS: uint64(v.Selectors[qmp.SegSS]),
		DS: uint64(v.Selectors[qmp.SegDS]), FS: uint64(v.Selectors[qmp.SegFS]), GS: uint64(v.Selectors[qmp.SegGS]),
		FSBase: v.FSBase, GSBase: v.GSBase,
	}
	if r.CS == 0 {
		r.CS, r.SS = userCS64, userDS
	}
	return r
}

// checkCR3 checks that a vCPU in user mode runs on the process's page
// tables: CR3 holds its pgd, or with page-table isolation the user copy
// beside it (bit 12), and a PCID in the low 12 bits.
func checkCR3(v writer.CPU, root introspect.PAddr) error {
	const addrMask = 0x000f_ffff_ffff_f000
	const ptiUser = 1 << 12
	if introspect.PAddr(v.CR3&addrMask&^ptiUser) != root {
		return fmt.Errorf("its CR3 %#x is not the process's page tables at %#x", v.CR3, uint64(root))
	}
	return nil
}

// checkVMFlags checks the VM_ flags against the threads: each one's
// instruction pointer lies in a readable, executable area and its stack
// pointer in a writable one. Anything else means the flags (or the
// registers) are not what kvmckpt reads them as.
func checkVMFlags(vmas []introspect.VMA, threads []elfcore.Thread) error {
	find := func(addr uint64) *introspect.VMA {
		for i := range vmas {
			if vmas[i].Start <= addr && addr < vmas[i].End {
				return &vmas[i]
			}
		}
		return nil
	}
	for _, t := range threads {
		ip, sp := find(t.Regs.IP), find(t.Regs.SP)
		switch {
		case ip == nil || ip.Flags&(vmRead|vmExec) != vmRead|vmExec:
			return fmt.Errorf("%w: thread %d's instruction pointer %#x is in no executable area (VM_ flags %#x): this kernel's VM_ flags or saved registers are not what kvmckpt reads", introspect.ErrKernel, t.PID, t.Regs.IP, flagsOf(ip))
		case sp == nil || sp.Flags&(vmRead|vmWrite) != vmRead|vmWrite:
			return fmt.Errorf("%w: thread %d's stack pointer %#x is in no writable area (VM_ flags %#x): this kernel's VM_ flags or saved registers are not what kvmckpt reads", introspect.ErrKernel, t.PID, t.Regs.SP, flagsOf(sp))
		}
	}
	return nil
}

func flagsOf(v *introspect.VMA) uint64 {
	if v == nil {
		return 0
	}
	return v.Flags
}

// coreMemory is the process's memory as the core reads it: the vDSO from
// the kernel's image, the rest through the process's page tables.
type coreMemory struct {
	ctx   context.Context
	mem   *introspect.UserMemory
	vdso  uint64
	image []byte
}

func (m *coreMemory) ReadAt(p []byte, addr uint64) error {
	if err := m.ctx.Err(); err != nil {
		return err
	}
	if m.vdso != 0 && addr >= m.vdso && addr-m.vdso < uint64(len(m.image)) {
		off := addr - m.vdso
		if uint64(len(p)) > uint64(len(m.image))-off {
			return fmt.Errorf("read past the vDSO")
		}
		copy(p, m.image[off:])
		return nil
	}
	return m.mem.ReadAt(p, addr)
}
