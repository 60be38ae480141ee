package qmp

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
)

// Registers is the part of an x86 vCPU's state that guest introspection
// starts from. Under KVM, QEMU fetches the state from the kernel before
// printing it (cpu_synchronize_state), so it is current for a stopped guest.
type Registers struct {
	// CPU is the vCPU's index (its "CPU#N" header).
	CPU int
	// RIP, RSP and RFLAGS are the instruction pointer, stack pointer and
	// flags; outside 64-bit mode QEMU prints them as EIP, ESP and EFL.
	RIP, RSP, RFLAGS uint64
	// CR0, CR2, CR3 and CR4 are the control registers; see the CR* bit
	// constants and [Registers.PagingLevels].
	CR0, CR2, CR3, CR4 uint64
	// EFER is the extended feature enable MSR (0xC0000080).
	EFER uint64
	// CPL is the current privilege level, 0 to 3.
	CPL int
	// GPR are the general-purpose registers in the x86 encoding order
	// (RAX RCX RDX RBX RSP RBP RSI RDI R8..R15), valid if HasGPR: the
	// 64-bit dump prints them all. GPR[4] is RSP.
	GPR    [16]uint64
	HasGPR bool
	// Seg are the segment registers ES CS SS DS FS GS: selector and base
	// (the FS and GS bases are a thread's TLS pointers).
	Seg [6]Segment
}

// Segment is a segment register as "info registers" prints it.
type Segment struct {
	Selector uint16
	Base     uint64
}

// Indexes of [Registers.Seg].
const (
	SegES = iota
	SegCS
	SegSS
	SegDS
	SegFS
	SegGS
)

// gprNames are the 64-bit dump's names of [Registers.GPR].
var gprNames = [16]string{"RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI",
	"R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15"}

// segNames are the dump's names of [Registers.Seg].
var segNames = [6]string{"ES", "CS", "SS", "DS", "FS", "GS"}

// CPURegisters returns the registers of vCPU cpu (0 for the first), from
// the human monitor's "info registers" (target/i386/cpu-dump.c,
// x86_cpu_dump_state) run with that CPU selected.
func (s *Session) CPURegisters(ctx context.Context, cpu int) (Registers, error) {
	if cpu < 0 {
		return Registers{}, fmt.Errorf("read registers: invalid CPU index %d", cpu)
	}
	out, err := s.HumanMonitorCommand(ctx, "info registers", cpu)
	if err != nil {
		return Registers{}, fmt.Errorf("read registers of CPU %d: %w", cpu, err)
	}
	regs, err := parseRegisters(strings.NewReader(out))
	if err != nil {
		return Registers{}, fmt.Errorf("read registers of CPU %d: %w", cpu, err)
	}
	if regs.CPU != cpu {
		return Registers{}, fmt.Errorf("read registers of CPU %d: %w: QEMU printed CPU#%d", cpu, ErrMalformed, regs.CPU)
	}
	return regs, nil
}

// registersMaxLine bounds one line of "info registers"; real lines are
// under 100 bytes.
const registersMaxLine = 4096

// parseRegisters parses the first CPU's block of "info registers" output.
// Lines are NAME=HEX pairs separated by spaces, with names padded before
// the "=" ("R8 =..."). Both the 64-bit and the 32-bit layouts are accepted.
// CR0, CR3, CR4, EFER and the instruction pointer are required; a missing
// one is an error wrapping [ErrMalformed].
func parseRegisters(r io.Reader) (Registers, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 256), registersMaxLine)
	regs := Registers{CPU: -1}
	vals := make(map[string]uint64)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if n, ok := strings.CutPrefix(line, "CPU#"); ok {
			if regs.CPU >= 0 {
				break // the next CPU's block, in "info registers -a" output
			}
			cpu, err := strconv.ParseUint(n, 10, 16)
			if err != nil {
				return Registers{}, fmt.Errorf("parse registers: %w: bad header %q", ErrMalformed, line)
			}
			regs.CPU = int(cpu)
			continue
		}
		parseRegisterLine(line, vals)
	}
	if err := sc.Err(); err != nil {
		return Registers{}, fmt.Errorf("parse registers: %w: %v", ErrMalformed, err)
	}
	if regs.CPU < 0 {
		return Registers{}, fmt.Errorf("parse registers: %w: no CPU#N header", ErrMalformed)
	}
	get := func(dst *uint64, names ...string) error {
		for _, n := range names {
			if v, ok := vals[n]; ok {
				*dst = v
				return nil
			}
		}
		return fmt.Errorf("parse registers: %w: no %s", ErrMalformed, names[0])
	}
	for _, f := range []struct {
		dst   *uint64
		names []string
	}{
		{&regs.RIP, []string{"RIP", "EIP"}},
		{&regs.CR0, []string{"CR0"}},
		{&regs.CR3, []string{"CR3"}},
		{&regs.CR4, []string{"CR4"}},
		{&regs.EFER, []string{"EFER"}},
	} {
		if err := get(f.dst, f.names...); err != nil {
			return Registers{}, err
		}
	}
	// Optional: absent from older or stripped-down dumps.
	_ = get(&regs.RSP, "RSP", "ESP")
	_ = get(&regs.RFLAGS, "RFL", "EFL")
	_ = get(&regs.CR2, "CR2")
	var cpl uint64
	if get(&cpl, "CPL") == nil && cpl <= 3 {
		regs.CPL = int(cpl)
	}
	regs.HasGPR = true
	for i, n := range gprNames {
		if get(&regs.GPR[i], n) != nil {
			regs.HasGPR, regs.GPR = false, [16]uint64{}
			break
		}
	}
	for i, n := range segNames {
		var sel uint64
		if get(&sel, n) == nil && sel <= 0xffff {
			regs.Seg[i].Selector = uint16(sel)
		}
		_ = get(&regs.Seg[i].Base, n+"_BASE")
	}
	return regs, nil
}

// parseRegisterLine adds the NAME=HEX pairs of one line to vals, keeping
// the first value of a name. Tokens that are not such pairs (flag strings
// like "[--S-A-C]", the second half of an XMM register) are skipped.
func parseRegisterLine(line string, vals map[string]uint64) {
	fields := strings.Fields(line)
	for i := 0; i < len(fields); i++ {
		f := fields[i]
		name, val, ok := strings.Cut(f, "=")
		if !ok {
			// "R8 =..." and "ES =...": the name padded to three columns.
			if i+1 < len(fields) && strings.HasPrefix(fields[i+1], "=") {
				name, val = f, fields[i+1][1:]
				i++
			} else {
				continue
			}
		}
		if !isRegisterName(name) {
			continue
		}
		v, err := parseHex(val)
		if err != nil {
			continue
		}
		if _, dup := vals[name]; !dup {
			vals[name] = v
		}
		// A segment line: "FS =0000 00007f0123456000 ffffffff 00cff300":
		// the selector, then the base.
		if slices.Contains(segNames[:], name) && i+1 < len(fields) {
			if base, err := parseHex(fields[i+1]); err == nil {
				if _, dup := vals[name+"_BASE"]; !dup {
					vals[name+"_BASE"] = base
				}
				i++
			}
		}
	}
}

// isRegisterName reports whether s is an upper-case name like "CR0" or
// "R10".
func isRegisterName(s string) bool {
	if s == "" || len(s) > 8 || s[0] < 'A' || s[0] > 'Z' {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !('A' <= c && c <= 'Z' || '0' <= c && c <= '9') {
			return false
		}
	}
	return true
}

// maxCPUs bounds the vCPUs a reply may list (QEMU's x86 limit is 4096
// without the 64-bit APIC ids of x2APIC; 1<<16 leaves room).
const maxCPUs = 1 << 16

// CPUIndexes returns the index of every vCPU (query-cpus-fast), the
// numbers [Session.CPURegisters] takes, in QEMU's order.
func (s *Session) CPUIndexes(ctx context.Context) ([]int, error) {
	var r []struct {
		Index *int `json:"cpu-index"`
	}
	if err := s.Run(ctx, "query-cpus-fast", nil, &r); err != nil {
		return nil, fmt.Errorf("query vCPUs: %w", err)
	}
	if len(r) == 0 || len(r) > maxCPUs {
		return nil, fmt.Errorf("query vCPUs: %w: %d vCPUs", ErrMalformed, len(r))
	}
	out := make([]int, 0, len(r))
	for _, c := range r {
		if c.Index == nil || *c.Index < 0 || *c.Index >= maxCPUs {
			return nil, fmt.Errorf("query vCPUs: %w: a vCPU without a valid cpu-index", ErrMalformed)
		}
		out = append(out, *c.Index)
	}
	return out, nil
}
