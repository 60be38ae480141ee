package introspect

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/kvmckpt/kvmckpt/profiles"
)

// Task is one task of the guest kernel: a thread, the leader of its
// thread group included. IDs are the kernel's: PID is the thread's id,
// TGID the process's, both in the initial pid namespace; NsPID and NsTGID
// in the task's own (innermost) namespace.
type Task struct {
	PID    int32 `json:"pid"`
	TGID   int32 `json:"tgid"`
	NsPID  int32 `json:"ns_pid"`
	NsTGID int32 `json:"ns_tgid"`
	// PPID is the TGID of the real parent, in the initial namespace.
	PPID int32 `json:"ppid"`
	// State is the letter ps prints: R S D T t X Z P I.
	State string `json:"state"`
	// UID and EUID are the real and effective user ids (initial user
	// namespace).
	UID  uint32 `json:"uid"`
	EUID uint32 `json:"euid"`
	// Comm is the task's name, at most 15 bytes, as the guest set it:
	// untrusted text.
	Comm string `json:"comm"`
	// KernelThread is PF_KTHREAD.
	KernelThread bool `json:"kernel_thread"`
	// CPU is the CPU the task last ran on; OnCPU says it was running
	// there when the guest paused.
	CPU   int32 `json:"cpu"`
	OnCPU bool  `json:"on_cpu"`
	// Threads is the thread group's thread count (signal->nr_threads).
	Threads int32 `json:"threads"`
	// RSSPages is the mm's resident pages (file, anonymous, shmem), as
	// /proc/PID/status reports them; 0 without an mm.
	RSSPages uint64 `json:"rss_pages"`

	// Addr is the task_struct's kernel address; MM its mm_struct's (0
	// for a kernel thread).
	Addr VAddr `json:"-"`
	MM   VAddr `json:"-"`
}

// Macros of the kernel that are in no profile (include/linux/sched.h):
// the same in 6.1 and 6.12, and checked against what they imply on every
// walk ([Kernel.Tasks]).
const (
	pfKthread = 0x00200000 // PF_KTHREAD
	// Task states (__state | exit_state). TASK_REPORT is the bits ps
	// shows; TASK_IDLE (UNINTERRUPTIBLE|NOLOAD) shows as I.
	taskReport    = 0x7f
	taskIdle      = 0x402
	taskRTLock    = 0x1000 // TASK_RTLOCK_WAIT: shown as D
	taskStateMask = 0xffff // every bit below TASK_STATE_MAX
	// MAX_PID_NS_LEVEL bounds pid namespace nesting.
	maxPidNsLevel = 32
	// mm counters (enum in include/linux/mm_types_task.h): RSS is
	// file + anonymous + shmem.
	mmFilePages, mmAnonPages, mmShmemPages, nrMMCounters = 0, 1, 3, 4
)

// taskStateLetters are ps's letters by fls(state & TASK_REPORT), the
// kernel's task_state_array.
const taskStateLetters = "RSDTtXZPI"

// maxTasks bounds a task list walk: PID_MAX_LIMIT. maxGroupScan bounds
// the search of a thread group for its leader.
const (
	maxTasks     = 1 << 22
	maxGroupScan = 1 << 16
)

// taskLayout is what the task walk needs from a profile, resolved once.
type taskLayout struct {
	taskSize                                               uint64
	tasks, pid, tgid, comm, state, flags, mm, parent, cred uint64
	signal, threadNode, threadPid, exitState, cpu, onCPU   uint64
	hasCPU, hasOnCPU                                       bool
	sigThreadHead, sigNrThreads                            uint64
	pidLevel, pidNumbers, upidSize, upidNr                 uint64
	credUID, credEUID                                      uint64
	mmRSS, mmRSSStride, mmRSSCount                         uint64
	mmPgd, mmArgStart, mmArgEnd                            uint64
	span                                                   uint64 // bytes of task_struct read: up to the last field used
}

func resolveTaskLayout(p *profiles.Profile) (*taskLayout, error) {
	var missing []string
	field := func(st, f string, width uint64) uint64 { return fieldOffset(p, &missing, st, f, width) }
	l := &taskLayout{}
	l.tasks = field("task_struct", "tasks", 16)
	l.pid = field("task_struct", "pid", 4)
	l.tgid = field("task_struct", "tgid", 4)
	l.comm = field("task_struct", "comm", 16)
	l.state = field("task_struct", "__state", 4)
	l.flags = field("task_struct", "flags", 4)
	l.mm = field("task_struct", "mm", 8)
	l.parent = field("task_struct", "real_parent", 8)
	l.cred = field("task_struct", "real_cred", 8)
	l.signal = field("task_struct", "signal", 8)
	l.threadNode = field("task_struct", "thread_node", 16)
	l.threadPid = field("task_struct", "thread_pid", 8)
	l.exitState = field("task_struct", "exit_state", 4)
	if f, ok := p.Structs["task_struct"].Fields["thread_info.cpu"]; ok {
		l.cpu, l.hasCPU = f.Offset, true
	}
	if f, ok := p.Structs["task_struct"].Fields["on_cpu"]; ok {
		l.onCPU, l.hasOnCPU = f.Offset, true
	}
	l.taskSize = p.Structs["task_struct"].Size
	l.sigThreadHead = field("signal_struct", "thread_head", 16)
	l.sigNrThreads = field("signal_struct", "nr_threads", 4)
	l.pidLevel = field("pid", "level", 4)
	l.pidNumbers = field("pid", "numbers", 0)
	l.upidNr = field("upid", "nr", 4)
	l.upidSize = p.Structs["upid"].Size
	l.credUID = field("cred", "uid", 4)
	l.credEUID = field("cred", "euid", 4)
	// RSS counters: struct mm_rss_stat { atomic_long_t count[] } in 6.1,
	// struct percpu_counter rss_stat[] since 6.2, whose count is the
	// value /proc reports (percpu_counter_read_positive).
	l.mmPgd = field("mm_struct", "pgd", 8)
	l.mmArgStart = field("mm_struct", "arg_start", 8)
	l.mmArgEnd = field("mm_struct", "arg_end", 8)
	rss := field("mm_struct", "rss_stat", 8)
	if f, ok := p.Structs["mm_struct"].Fields["rss_stat.count"]; ok && f.Count >= nrMMCounters {
		l.mmRSS, l.mmRSSStride, l.mmRSSCount = f.Offset, 8, f.Count
	} else if f := p.Structs["mm_struct"].Fields["rss_stat"]; f.Count >= nrMMCounters && f.Size%f.Count == 0 {
		l.mmRSS, l.mmRSSStride, l.mmRSSCount = rss+field("percpu_counter", "count", 8), f.Size/f.Count, f.Count
	} else {
		missing = append(missing, "mm_struct.rss_stat (neither counters nor percpu_counters)")
	}
	if l.upidSize < l.upidNr+4 || l.upidSize > 64 {
		missing = append(missing, fmt.Sprintf("size of struct upid %d", l.upidSize))
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("%w: the profile lacks what tasks are read with (%v); a profile built before kvmckpt read tasks: remove it to have it rebuilt", ErrProfile, missing)
	}
	for _, off := range []uint64{l.tasks + 16, l.pid + 4, l.tgid + 4, l.comm + 16, l.state + 4, l.flags + 4, l.mm + 8,
		l.parent + 8, l.cred + 8, l.signal + 8, l.threadNode + 16, l.threadPid + 8, l.exitState + 4, l.cpu + 4, l.onCPU + 4} {
		l.span = max(l.span, off)
	}
	return l, nil
}

// TaskOptions say what [Kernel.Tasks] lists.
type TaskOptions struct {
	// Threads lists every thread, not only thread-group leaders.
	Threads bool
}

// Tasks lists the guest's tasks: the thread-group leaders on init_task's
// task list, and with opt.Threads every thread of each group (on
// signal->thread_head), in list order. The idle tasks (pid 0) are not
// listed, as ps does not list them.
//
// Guest memory is untrusted: every list link is checked (a canonical
// kernel address whose back link points back), a task met twice or more
// than PID_MAX_LIMIT of them ends the walk with an error, and the
// kernel's macros the walk relies on (PF_KTHREAD, the task state bits)
// are checked against the tasks every kernel has: init (pid 1) is no
// kernel thread, kthreadd (pid 2) is. An error wraps [ErrKernel] or
// [ErrProfile]; nothing is guessed.
func (k *Kernel) Tasks(ctx context.Context, opt TaskOptions) ([]Task, error) {
	l, err := resolveTaskLayout(k.Profile)
	if err != nil {
		return nil, err
	}
	init, err := k.Sym("init_task")
	if err != nil {
		return nil, err
	}
	w := &taskWalk{k: k, l: l, seen: map[VAddr]bool{}, buf: make([]byte, l.span)}
	var out []Task
	err = w.list(init+VAddr(l.tasks), l.tasks, func(leader VAddr) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		t, err := w.task(leader)
		if err != nil {
			return err
		}
		if !opt.Threads {
			out = append(out, t)
			return nil
		}
		sig, err := k.Uint64(leader + VAddr(l.signal))
		if err != nil {
			return w.bad(leader, "signal", err)
		}
		return w.list(VAddr(sig)+VAddr(l.sigThreadHead), l.threadNode, func(th VAddr) error {
			if th == leader {
				out = append(out, t)
				return nil
			}
			tt, err := w.task(th)
			if err != nil {
				return err
			}
			out = append(out, tt)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	if err := checkTaskMacros(out); err != nil {
		return nil, err
	}
	return out, nil
}

// taskWalk is one walk's state.
type taskWalk struct {
	k    *Kernel
	l    *taskLayout
	seen map[VAddr]bool // list nodes visited, over all lists
	n    int
	buf  []byte
}

func (w *taskWalk) bad(task VAddr, what string, err error) error {
	return fmt.Errorf("%w: task at %#x: %s: %w", ErrKernel, uint64(task), what, err)
}

// list calls fn with the container of every node of the circular list
// whose head is at head, the list_head being at off in the container.
func (w *taskWalk) list(head VAddr, off uint64, fn func(VAddr) error) error {
	prev := head
	next, err := w.k.Uint64(head)
	if err != nil {
		return fmt.Errorf("%w: list head at %#x: %w", ErrKernel, uint64(head), err)
	}
	for VAddr(next) != head {
		node := VAddr(next)
		if !w.k.Tr.Canonical(node) || uint64(node) < 1<<63 || node%8 != 0 {
			return fmt.Errorf("%w: task list link %#x after %#x is no kernel address", ErrKernel, next, uint64(prev))
		}
		back, err := w.k.Uint64(node + 8)
		if err != nil {
			return fmt.Errorf("%w: task list node at %#x: %w", ErrKernel, next, err)
		}
		if VAddr(back) != prev {
			return fmt.Errorf("%w: task list node at %#x links back to %#x, not %#x (the guest was paused mid-update, or this is not a task list)", ErrKernel, next, back, uint64(prev))
		}
		if w.seen[node] {
			return fmt.Errorf("%w: task list node at %#x met twice", ErrKernel, next)
		}
		w.seen[node] = true
		if w.n++; w.n > maxTasks {
			return fmt.Errorf("%w: more than %d tasks", ErrKernel, maxTasks)
		}
		if err := fn(node - VAddr(off)); err != nil {
			return err
		}
		prev = node
		if next, err = w.k.Uint64(node); err != nil {
			return fmt.Errorf("%w: task list node at %#x: %w", ErrKernel, uint64(node), err)
		}
	}
	return nil
}

// task reads the task_struct at va.
func (w *taskWalk) task(va VAddr) (Task, error) {
	k, l, b := w.k, w.l, w.buf
	if err := k.ReadVirt(b, va); err != nil {
		return Task{}, w.bad(va, "read", err)
	}
	u32 := func(off uint64) uint32 { return binary.LittleEndian.Uint32(b[off:]) }
	u64 := func(off uint64) uint64 { return binary.LittleEndian.Uint64(b[off:]) }
	t := Task{
		Addr: va,
		PID:  int32(u32(l.pid)), TGID: int32(u32(l.tgid)),
		KernelThread: u32(l.flags)&pfKthread != 0,
		MM:           VAddr(u64(l.mm)),
	}
	comm := b[l.comm : l.comm+16]
	if i := bytes.IndexByte(comm, 0); i >= 0 {
		comm = comm[:i]
	}
	t.Comm = string(comm)
	state := u32(l.state)
	exit := u32(l.exitState)
	if (state|exit)&^taskStateMask != 0 {
		return Task{}, w.bad(va, "state", fmt.Errorf("bits %#x beyond TASK_STATE_MAX: this kernel's task states are not 6.1's", state|exit))
	}
	t.State = taskState(state, exit)
	if l.hasCPU {
		t.CPU = int32(u32(l.cpu))
	}
	if l.hasOnCPU {
		t.OnCPU = u32(l.onCPU) != 0
	}
	parent := VAddr(u64(l.parent))
	ppid, err := k.Uint32(parent + VAddr(l.tgid))
	if err != nil {
		return Task{}, w.bad(va, "real_parent", err)
	}
	t.PPID = int32(ppid)
	if cred := VAddr(u64(l.cred)); cred != 0 {
		if t.UID, err = k.Uint32(cred + VAddr(l.credUID)); err != nil {
			return Task{}, w.bad(va, "cred", err)
		}
		if t.EUID, err = k.Uint32(cred + VAddr(l.credEUID)); err != nil {
			return Task{}, w.bad(va, "cred", err)
		}
	}
	if t.NsPID, err = w.nsPID(VAddr(u64(l.threadPid))); err != nil {
		return Task{}, w.bad(va, "thread_pid", err)
	}
	t.NsTGID = t.NsPID
	if t.TGID != t.PID {
		// The leader's own id in the namespace: the group shares one.
		leaderPid, err := w.leaderPid(VAddr(u64(l.signal)))
		if err != nil {
			return Task{}, w.bad(va, "group leader", err)
		}
		t.NsTGID = leaderPid
	}
	if sig := VAddr(u64(l.signal)); sig != 0 {
		n, err := k.Uint32(sig + VAddr(l.sigNrThreads))
		if err != nil {
			return Task{}, w.bad(va, "signal", err)
		}
		t.Threads = int32(n)
	}
	if t.MM != 0 && !t.KernelThread {
		for _, i := range []uint64{mmFilePages, mmAnonPages, mmShmemPages} {
			v, err := k.Uint64(t.MM + VAddr(l.mmRSS+i*l.mmRSSStride))
			if err != nil {
				return Task{}, w.bad(va, "mm", err)
			}
			if int64(v) > 0 { // counters may be transiently negative
				t.RSSPages += v
			}
		}
	}
	return t, nil
}

// nsPID returns the number of the struct pid at p in its innermost
// namespace (pid_nr_ns with the pid's own level).
func (w *taskWalk) nsPID(p VAddr) (int32, error) {
	if p == 0 {
		return 0, nil // an exiting task
	}
	level, err := w.k.Uint32(p + VAddr(w.l.pidLevel))
	if err != nil {
		return 0, err
	}
	if level > maxPidNsLevel {
		return 0, fmt.Errorf("pid namespace level %d", level)
	}
	nr, err := w.k.Uint32(p + VAddr(w.l.pidNumbers+uint64(level)*w.l.upidSize+w.l.upidNr))
	return int32(nr), err
}

// leaderPid returns the thread group leader's id in its namespace: the
// first thread on signal->thread_head is not always the leader, so the
// leader is found by its pid equal to the tgid.
func (w *taskWalk) leaderPid(sig VAddr) (int32, error) {
	if sig == 0 {
		return 0, errors.New("no signal_struct")
	}
	head := sig + VAddr(w.l.sigThreadHead)
	node, err := w.k.Uint64(head)
	for n := 0; err == nil && VAddr(node) != head && n < maxGroupScan; n++ {
		task := VAddr(node) - VAddr(w.l.threadNode)
		pid, err1 := w.k.Uint32(task + VAddr(w.l.pid))
		tgid, err2 := w.k.Uint32(task + VAddr(w.l.tgid))
		if err1 != nil || err2 != nil {
			return 0, errors.Join(err1, err2)
		}
		if pid == tgid {
			tp, err := w.k.Uint64(task + VAddr(w.l.threadPid))
			if err != nil {
				return 0, err
			}
			return w.nsPID(VAddr(tp))
		}
		node, err = w.k.Uint64(VAddr(node))
	}
	if err != nil {
		return 0, err
	}
	return 0, errors.New("leader not on its group's thread list")
}

// taskState is the kernel's task_state_index as a letter.
func taskState(state, exit uint32) string {
	s := (state | exit) & taskReport
	switch {
	case state&taskIdle == taskIdle:
		return "I"
	case state == taskRTLock:
		return "D"
	}
	i := 0
	for s != 0 {
		i++
		s >>= 1
	}
	return taskStateLetters[i : i+1]
}

// checkTaskMacros checks the macros the walk relies on against the tasks
// every Linux has: init is a user process, kthreadd a kernel thread.
func checkTaskMacros(tasks []Task) error {
	for _, t := range tasks {
		switch {
		case t.PID == 1 && t.KernelThread:
			return fmt.Errorf("%w: pid 1 (%q) has PF_KTHREAD (%#x) set: this kernel's task flags are not 6.1's", ErrKernel, t.Comm, pfKthread)
		case t.PID == 2 && t.Comm == "kthreadd" && !t.KernelThread:
			return fmt.Errorf("%w: kthreadd lacks PF_KTHREAD (%#x): this kernel's task flags are not 6.1's", ErrKernel, pfKthread)
		}
	}
	return nil
}

// maxCmdline bounds the command line read from a process: the kernel's
// own bound on the argument strings is MAX_ARG_STRLEN per string and the
// stack limit for all; ps reads 128 KiB.
const maxCmdline = 128 << 10

// userTranslator returns the page-table walker of the address space of
// the mm_struct at mm.
func (k *Kernel) userTranslator(l *taskLayout, mm VAddr) (*Translator, error) {
	pgd, err := k.Uint64(mm + VAddr(l.mmPgd))
	if err != nil {
		return nil, err
	}
	root, err := k.phys(VAddr(pgd))
	if err != nil {
		return nil, fmt.Errorf("mm's pgd %#x: %w", pgd, err)
	}
	if root%PageSize != 0 {
		return nil, fmt.Errorf("mm's pgd %#x is not page-aligned", pgd)
	}
	return &Translator{Mem: k.Mem, Root: root, LA57: k.Tr.LA57, ProtNone: true}, nil
}

// Cmdline reads a process's command line from its memory, as
// /proc/PID/cmdline shows it: the NUL-separated strings between the mm's
// arg_start and arg_end, at most 128 KiB. Pages of it that are not in
// guest RAM (swapped out) end it early: truncated is then true. A task
// without an mm (a kernel thread) has none. The strings are the guest
// process's: untrusted text.
func (k *Kernel) Cmdline(t Task) (args []string, truncated bool, err error) {
	if t.MM == 0 || t.KernelThread {
		return nil, false, nil
	}
	l, err := resolveTaskLayout(k.Profile)
	if err != nil {
		return nil, false, err
	}
	start, err1 := k.Uint64(t.MM + VAddr(l.mmArgStart))
	end, err2 := k.Uint64(t.MM + VAddr(l.mmArgEnd))
	if err := errors.Join(err1, err2); err != nil {
		return nil, false, fmt.Errorf("%w: mm of pid %d: %w", ErrKernel, t.PID, err)
	}
	if end < start || start >= 1<<63 {
		return nil, false, fmt.Errorf("%w: pid %d's arguments at [%#x, %#x)", ErrKernel, t.PID, start, end)
	}
	n := min(end-start, maxCmdline)
	if n == 0 {
		return nil, false, nil
	}
	tr, err := k.userTranslator(l, t.MM)
	if err != nil {
		return nil, false, fmt.Errorf("%w: pid %d: %w", ErrKernel, t.PID, err)
	}
	buf := make([]byte, n)
	got, _ := tr.ReadVirt(buf, VAddr(start))
	truncated = uint64(got) < n || end-start > maxCmdline
	buf = bytes.TrimRight(buf[:got], "\x00")
	if len(buf) == 0 {
		return nil, truncated, nil
	}
	for _, a := range bytes.Split(buf, []byte{0}) {
		args = append(args, string(a))
	}
	return args, truncated, nil
}
