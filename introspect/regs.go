package introspect

import (
	"cmp"
	"encoding/binary"
	"fmt"
)

// UserRegs are a thread's user-mode registers in user_regs_struct's order
// (arch/x86/include/asm/user_64.h): pt_regs' 21 words, then the TLS bases
// and the data selectors.
type UserRegs struct {
	R15, R14, R13, R12, BP, BX, R11, R10, R9, R8 uint64
	AX, CX, DX, SI, DI, OrigAX, IP, CS, Flags    uint64
	SP, SS, FSBase, GSBase, DS, ES, FS, GS       uint64
}

// Macros of arch/x86 that are in no profile, checked by what they imply
// (every user thread's saved CS and SS are user selectors).
const (
	// threadSize is THREAD_SIZE: PAGE_SIZE << (2 + KASAN_STACK_ORDER),
	// 16 KiB without KASAN (Debian's kernels).
	threadSize = 16 << 10
	// fredStackPadding is TOP_OF_KERNEL_STACK_PADDING with CONFIG_X86_FRED
	// (6.9+); 0 without.
	fredStackPadding = 16
	// fredSymbol is a symbol only FRED kernels have.
	fredSymbol = "asm_fred_entrypoint_user"
	// User selectors (arch/x86/include/asm/segment.h): a user thread's CS
	// and SS have RPL 3.
	userRPL = 3
)

// regsLayout is what saved registers are read with.
type regsLayout struct {
	taskStack, fsbase, gsbase, ds, es, fsindex, gsindex uint64
	ptRegsSize                                          uint64
	ptRegs                                              [21]uint64 // offsets of pt_regs' words, in user_regs_struct order
}

// ptRegsNames are pt_regs' members in user_regs_struct order.
var ptRegsNames = [21]string{"r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8",
	"ax", "cx", "dx", "si", "di", "orig_ax", "ip", "cs", "flags", "sp", "ss"}

func resolveRegsLayout(k *Kernel) (*regsLayout, error) {
	p := k.Profile
	var missing []string
	field := func(st, f string, width uint64) uint64 { return fieldOffset(p, &missing, st, f, width) }
	l := &regsLayout{}
	l.taskStack = field("task_struct", "stack", 8)
	l.fsbase = field("task_struct", "thread.fsbase", 8)
	l.gsbase = field("task_struct", "thread.gsbase", 8)
	l.ds = field("task_struct", "thread.ds", 2)
	l.es = field("task_struct", "thread.es", 2)
	l.fsindex = field("task_struct", "thread.fsindex", 2)
	l.gsindex = field("task_struct", "thread.gsindex", 2)
	for i, n := range ptRegsNames {
		// cs and ss are 16 bits in 6.12 (beside FRED's fields), longs in
		// 6.1: read 2 bytes of them.
		width := uint64(8)
		if n == "cs" || n == "ss" {
			width = 2
		}
		l.ptRegs[i] = field("pt_regs", n, width)
	}
	l.ptRegsSize = p.Structs["pt_regs"].Size
	if l.ptRegsSize != 21*8 {
		missing = append(missing, fmt.Sprintf("pt_regs of %d bytes, not 168", l.ptRegsSize))
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("%w: the profile lacks what saved registers are read with (%v); a profile built before kvmckpt wrote cores: remove it to have it rebuilt", ErrProfile, missing)
	}
	return l, nil
}

// SavedUserRegs returns the user-mode registers of a user thread as its
// kernel saved them on entry (task_pt_regs: the pt_regs at the top of its
// kernel stack) with its TLS bases and selectors from thread_struct. They
// are the thread's registers unless it was running in user mode when the
// guest paused: then the vCPU has them.
//
// THREAD_SIZE and the stack's top padding are macros: the result is
// checked, and a saved CS or SS that is no user selector is an error
// wrapping [ErrKernel], never a register set to be believed.
func (k *Kernel) SavedUserRegs(t Task) (UserRegs, error) {
	if t.KernelThread {
		return UserRegs{}, fmt.Errorf("pid %d (%s) is a kernel thread: it has no user registers", t.PID, t.Comm)
	}
	l, err := resolveRegsLayout(k)
	if err != nil {
		return UserRegs{}, err
	}
	stack, err := k.Uint64(t.Addr + VAddr(l.taskStack))
	if err != nil {
		return UserRegs{}, fmt.Errorf("%w: pid %d: stack: %w", ErrKernel, t.PID, err)
	}
	if stack%threadSize != 0 || stack < 1<<63 {
		return UserRegs{}, fmt.Errorf("%w: pid %d: kernel stack at %#x is no THREAD_SIZE-aligned kernel address", ErrKernel, t.PID, stack)
	}
	pad := uint64(0)
	if _, fred := k.Profile.Symbols[fredSymbol]; fred {
		pad = fredStackPadding
	}
	b := make([]byte, l.ptRegsSize)
	at := VAddr(stack + threadSize - pad - l.ptRegsSize)
	if err := k.ReadVirt(b, at); err != nil {
		return UserRegs{}, fmt.Errorf("%w: pid %d: pt_regs at %#x: %w", ErrKernel, t.PID, uint64(at), err)
	}
	var w [21]uint64
	for i, off := range l.ptRegs {
		if ptRegsNames[i] == "cs" || ptRegsNames[i] == "ss" {
			w[i] = uint64(binary.LittleEndian.Uint16(b[off:]))
			continue
		}
		w[i] = binary.LittleEndian.Uint64(b[off:])
	}
	r := UserRegs{
		R15: w[0], R14: w[1], R13: w[2], R12: w[3], BP: w[4], BX: w[5], R11: w[6], R10: w[7], R9: w[8], R8: w[9],
		AX: w[10], CX: w[11], DX: w[12], SI: w[13], DI: w[14], OrigAX: w[15], IP: w[16], CS: w[17], Flags: w[18],
		SP: w[19], SS: w[20],
	}
	if r.CS&3 != userRPL || r.SS&3 != userRPL || r.IP >= 1<<63 {
		return UserRegs{}, fmt.Errorf("%w: pid %d: the registers at the top of its kernel stack (%#x) hold CS %#x, SS %#x, IP %#x: no user-mode frame (this kernel's THREAD_SIZE or stack padding is not %d+%d)",
			ErrKernel, t.PID, uint64(at), r.CS, r.SS, r.IP, threadSize, pad)
	}
	var tsErr error
	u64 := func(off uint64) uint64 {
		v, err := k.Uint64(t.Addr + VAddr(off))
		tsErr = cmp.Or(tsErr, err)
		return v
	}
	u16 := func(off uint64) uint64 {
		var b [2]byte
		tsErr = cmp.Or(tsErr, k.ReadVirt(b[:], t.Addr+VAddr(off)))
		return uint64(binary.LittleEndian.Uint16(b[:]))
	}
	r.FSBase, r.GSBase = u64(l.fsbase), u64(l.gsbase)
	r.DS, r.ES, r.FS, r.GS = u16(l.ds), u16(l.es), u16(l.fsindex), u16(l.gsindex)
	if tsErr != nil {
		return UserRegs{}, fmt.Errorf("%w: pid %d: thread_struct: %w", ErrKernel, t.PID, tsErr)
	}
	return r, nil
}

// RunningTasks returns the task each possible CPU was running when the
// guest paused (its per-CPU current_task: a variable in 6.1, a member of
// pcpu_hot in 6.2+), by CPU number. An idle CPU runs its idle task (pid 0).
func (k *Kernel) RunningTasks() (map[int]VAddr, error) {
	var off uint64
	if v, ok := k.Profile.Symbols["pcpu_hot"]; ok {
		var missing []string
		f := fieldOffset(k.Profile, &missing, "pcpu_hot", "current_task", 8)
		if len(missing) > 0 {
			return nil, fmt.Errorf("%w: %v", ErrProfile, missing)
		}
		off = v + f
	} else if v, ok := k.Profile.Symbols["current_task"]; ok {
		off = v
	} else {
		return nil, fmt.Errorf("%w: no current_task or pcpu_hot symbol", ErrProfile)
	}
	// Per-CPU symbols are offsets into each CPU's area (x86-64 links the
	// per-CPU section at 0), never slid.
	if off >= 1<<32 {
		return nil, fmt.Errorf("%w: the per-CPU current task symbol %#x is no per-CPU offset", ErrProfile, off)
	}
	cpus, err := k.possibleCPUs()
	if err != nil {
		return nil, err
	}
	out := make(map[int]VAddr, len(cpus))
	for _, c := range cpus {
		cur, err := k.Uint64(VAddr(c.off + off))
		if err != nil {
			return nil, fmt.Errorf("%w: current task of CPU %d: %w", ErrKernel, c.id, err)
		}
		if cur < 1<<63 || cur%8 != 0 {
			return nil, fmt.Errorf("%w: current task of CPU %d is %#x, no kernel address", ErrKernel, c.id, cur)
		}
		out[c.id] = VAddr(cur)
	}
	return out, nil
}
