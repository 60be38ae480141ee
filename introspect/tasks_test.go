package introspect

import (
	"context"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// synthTask describes a task for [addTasks].
type synthTask struct {
	pid, tgid, ppid int32
	comm            string
	state, flags    uint32
	nsPid           int32 // id in a child pid namespace (level 1); 0: level 0 only
	uid, euid       uint32
	rss             [4]uint64 // mm counters; nil mm if all zero and kernel
	cpu             uint32
	onCPU           bool
}

// synthTasks places task_structs (and their signal, pid, cred and mm) in
// the direct map of a synthetic guest and links them as the kernel does:
// leaders on init_task.tasks, every thread on its group's
// signal->thread_head. It returns the tasks' addresses by pid.
func addTasks(t testing.TB, g *synthGuest, tasks []synthTask) map[int32]uint64 {
	t.Helper()
	l, err := resolveTaskLayout(g.p)
	require.NoError(t, err)
	direct := func(size uint64) (PAddr, uint64) {
		pa := g.alloc(size, 64)
		clear(g.ram[pa : uint64(pa)+size])
		return pa, g.directVA(pa)
	}
	link := func(headPA PAddr, headVA uint64, nodePA PAddr, nodeVA uint64) {
		// list_add_tail
		prevVA := g.get64(headPA + 8)
		prevPA := g.pa(prevVA)
		g.put64(nodePA, headVA)
		g.put64(nodePA+8, prevVA)
		g.put64(prevPA, nodeVA)
		g.put64(headPA+8, nodeVA)
	}
	initPA := g.symPA("init_task")
	initVA := uint64(g.text) + g.symOffset("init_task")
	// init_task: an empty task list, tgid 0.
	g.put64(initPA+PAddr(l.tasks), initVA+l.tasks)
	g.put64(initPA+PAddr(l.tasks)+8, initVA+l.tasks)
	copy(g.ram[initPA+PAddr(l.comm):], "swapper/0\x00")

	addrs := map[int32]uint64{0: initVA}
	signals := map[int32][2]uint64{} // tgid -> signal PA, VA
	for _, st := range tasks {
		pa, va := direct(l.taskSize)
		addrs[st.pid] = va
		g.put32(pa+PAddr(l.pid), uint32(st.pid))
		g.put32(pa+PAddr(l.tgid), uint32(st.tgid))
		copy(g.ram[pa+PAddr(l.comm):pa+PAddr(l.comm)+16], st.comm+"\x00")
		g.put32(pa+PAddr(l.state), st.state)
		g.put32(pa+PAddr(l.flags), st.flags)
		g.put32(pa+PAddr(l.cpu), st.cpu)
		if st.onCPU {
			g.put32(pa+PAddr(l.onCPU), 1)
		}
		parent, ok := addrs[st.ppid]
		require.True(t, ok, "parent %d before child %d", st.ppid, st.pid)
		g.put64(pa+PAddr(l.parent), parent)
		credPA, credVA := direct(g.p.Structs["cred"].Size)
		g.put32(credPA+PAddr(l.credUID), st.uid)
		g.put32(credPA+PAddr(l.credEUID), st.euid)
		g.put64(pa+PAddr(l.cred), credVA)
		pidPA, pidVA := direct(g.p.Structs["pid"].Size + 2*l.upidSize)
		g.put32(pidPA+PAddr(l.pidNumbers+l.upidNr), uint32(st.pid))
		if st.nsPid != 0 {
			g.put32(pidPA+PAddr(l.pidLevel), 1)
			g.put32(pidPA+PAddr(l.pidNumbers+l.upidSize+l.upidNr), uint32(st.nsPid))
		}
		g.put64(pa+PAddr(l.threadPid), pidVA)
		if st.rss != [4]uint64{} {
			mmPA, mmVA := direct(g.p.Structs["mm_struct"].Size)
			for i, v := range st.rss {
				g.put64(mmPA+PAddr(l.mmRSS+uint64(i)*l.mmRSSStride), v)
			}
			g.put64(pa+PAddr(l.mm), mmVA)
		}
		sig, ok := signals[st.tgid]
		if !ok {
			spa, sva := direct(g.p.Structs["signal_struct"].Size)
			head := sva + l.sigThreadHead
			g.put64(spa+PAddr(l.sigThreadHead), head)
			g.put64(spa+PAddr(l.sigThreadHead)+8, head)
			sig = [2]uint64{uint64(spa), sva}
			signals[st.tgid] = sig
		}
		g.put32(PAddr(sig[0])+PAddr(l.sigNrThreads), g.get32(PAddr(sig[0])+PAddr(l.sigNrThreads))+1)
		g.put64(pa+PAddr(l.signal), sig[1])
		link(PAddr(sig[0])+PAddr(l.sigThreadHead), sig[1]+l.sigThreadHead, pa+PAddr(l.threadNode), va+l.threadNode)
		if st.pid == st.tgid {
			link(initPA+PAddr(l.tasks), initVA+l.tasks, pa+PAddr(l.tasks), va+l.tasks)
		}
	}
	return addrs
}

// standardTasks is a small guest: init, kthreadd and a kernel worker, a
// two-thread process, and a process in a child pid namespace.
var standardTasks = []synthTask{
	{pid: 1, tgid: 1, ppid: 0, comm: "init", state: 1, rss: [4]uint64{100, 50, 7, 3}, uid: 0},
	{pid: 2, tgid: 2, ppid: 0, comm: "kthreadd", state: 1, flags: pfKthread},
	{pid: 3, tgid: 3, ppid: 2, comm: "kworker/0:0", state: 0x402, flags: pfKthread},
	{pid: 100, tgid: 100, ppid: 1, comm: "app", state: 0x2001, uid: 1000, euid: 0, rss: [4]uint64{10, 20, 0, 5}},
	{pid: 101, tgid: 100, ppid: 1, comm: "app-worker", state: 0, cpu: 1, onCPU: true, uid: 1000, euid: 0, rss: [4]uint64{10, 20, 0, 5}},
	{pid: 200, tgid: 200, ppid: 1, comm: "contained", state: 2, nsPid: 1, uid: 5, euid: 5, rss: [4]uint64{1, 1, 0, 0}},
	{pid: 300, tgid: 300, ppid: 100, comm: "zombie", state: 0, flags: 0},
}

func TestTasks(t *testing.T) {
	for _, la57 := range []bool{false, true} {
		g := newSynthGuest(t, realProfile(t), smallConfig(la57, 7))
		addrs := addTasks(t, g, standardTasks)
		// The zombie: exit_state EXIT_ZOMBIE.
		l, _ := resolveTaskLayout(g.p)
		g.put32(g.pa(addrs[300]+l.exitState), 0x20)
		k := g.kernel()
		ctx := context.Background()

		leaders, err := k.Tasks(ctx, TaskOptions{})
		require.NoError(t, err)
		var pids []int32
		for _, tk := range leaders {
			pids = append(pids, tk.PID)
		}
		assert.Equal(t, []int32{1, 2, 3, 100, 200, 300}, pids)

		all, err := k.Tasks(ctx, TaskOptions{Threads: true})
		require.NoError(t, err)
		byPid := map[int32]Task{}
		for _, tk := range all {
			byPid[tk.PID] = tk
		}
		require.Len(t, byPid, 7)
		init := byPid[1]
		assert.Equal(t, Task{PID: 1, TGID: 1, NsPID: 1, NsTGID: 1, PPID: 0, State: "S", Comm: "init", Threads: 1, RSSPages: 153,
			Addr: init.Addr, MM: init.MM}, init)
		assert.True(t, byPid[2].KernelThread)
		assert.Equal(t, "S", byPid[2].State)
		assert.Equal(t, "I", byPid[3].State, "TASK_IDLE")
		assert.Equal(t, int32(2), byPid[3].PPID)
		app, worker := byPid[100], byPid[101]
		assert.Equal(t, "S", app.State, "TASK_FREEZABLE|TASK_INTERRUPTIBLE (a futex wait) is S")
		assert.Equal(t, int32(2), app.Threads)
		assert.Equal(t, uint64(35), app.RSSPages)
		assert.Equal(t, "R", worker.State)
		assert.Equal(t, int32(100), worker.TGID)
		assert.Equal(t, int32(100), worker.NsTGID)
		assert.Equal(t, int32(1), worker.CPU)
		assert.True(t, worker.OnCPU)
		assert.Equal(t, [2]uint32{1000, 0}, [2]uint32{worker.UID, worker.EUID})
		c := byPid[200]
		assert.Equal(t, [2]int32{200, 1}, [2]int32{c.PID, c.NsPID}, "pid in the initial namespace and in its own")
		assert.Equal(t, int32(1), c.NsTGID)
		assert.Equal(t, "D", c.State)
		assert.Equal(t, "Z", byPid[300].State)
		assert.Zero(t, byPid[300].RSSPages, "no mm")
	}
}

func TestTaskState(t *testing.T) {
	for _, c := range []struct {
		state, exit uint32
		want        string
	}{
		{0, 0, "R"}, {1, 0, "S"}, {2, 0, "D"}, {4, 0, "T"}, {8, 0, "t"},
		{0, 0x10, "X"}, {0, 0x20, "Z"}, {0x40, 0, "P"}, {0x402, 0, "I"},
		{0x2001, 0, "S"}, {0x102, 0, "D"}, {0x1000, 0, "D"}, {0x2402, 0, "I"},
	} {
		assert.Equal(t, c.want, taskState(c.state, c.exit), "state %#x exit %#x", c.state, c.exit)
	}
}

// TestTasksHostile covers guest memory that is not a consistent task
// list: each gives an error wrapping ErrKernel, never a guessed list.
func TestTasksHostile(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		name string
		edit func(g *synthGuest, l *taskLayout, addrs map[int32]uint64)
		want string
	}{
		{"back link", func(g *synthGuest, l *taskLayout, a map[int32]uint64) {
			g.put64(g.pa(a[2]+l.tasks+8), a[100]+l.tasks)
		}, "links back"},
		{"shared thread list", func(g *synthGuest, l *taskLayout, a map[int32]uint64) {
			// 200 claims 100's threads: a walk that followed it would
			// list them twice (a cycle within one list fails its back
			// links first).
			g.put64(g.pa(a[200]+l.signal), g.get64(g.pa(a[100]+l.signal)))
		}, "met twice"},
		{"user address", func(g *synthGuest, l *taskLayout, a map[int32]uint64) {
			g.put64(g.pa(a[1]+l.tasks), 0x7fff00001000)
		}, "no kernel address"},
		{"init a kernel thread", func(g *synthGuest, l *taskLayout, a map[int32]uint64) {
			g.put32(g.pa(a[1]+l.flags), pfKthread)
		}, "PF_KTHREAD"},
		{"unknown state bits", func(g *synthGuest, l *taskLayout, a map[int32]uint64) {
			g.put32(g.pa(a[100]+l.state), 0x20000)
		}, "TASK_STATE_MAX"},
		{"pid namespace too deep", func(g *synthGuest, l *taskLayout, a map[int32]uint64) {
			pid := g.get64(g.pa(a[200] + l.threadPid))
			g.put32(g.pa(pid+l.pidLevel), 1000)
		}, "namespace level"},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := newSynthGuest(t, realProfile(t), smallConfig(false, 3))
			addrs := addTasks(t, g, standardTasks)
			l, _ := resolveTaskLayout(g.p)
			c.edit(g, l, addrs)
			_, err := g.kernel().Tasks(ctx, TaskOptions{Threads: true})
			require.Error(t, err)
			assert.True(t, errors.Is(err, ErrKernel), "%v", err)
			assert.Contains(t, err.Error(), c.want)
		})
	}
}

// FuzzTasks overwrites bytes of a synthetic guest's task structures with
// the fuzzer's: the walk ends with a list or an error, never a panic or
// a hang.
func FuzzTasks(f *testing.F) {
	f.Add(uint16(0), []byte{0xff})
	f.Add(uint16(2192), []byte{0, 0, 0, 0, 0, 0, 0, 0})
	g := newSynthGuest(f, realProfile(f), smallConfig(false, 5))
	addrs := addTasks(f, g, standardTasks)
	var region []PAddr
	for _, va := range addrs {
		if va >= g.pageOffsetBase && va < g.pageOffsetBase+g.maxPFN*PageSize {
			region = append(region, PAddr(va-g.pageOffsetBase))
		}
	}
	f.Fuzz(func(t *testing.T, off uint16, data []byte) {
		if len(region) == 0 || len(data) > 64 {
			return
		}
		base := region[int(off)%len(region)] + PAddr(off)%PAddr(8192)
		saved := append([]byte(nil), g.ram[base:base+PAddr(len(data))]...)
		copy(g.ram[base:], data)
		defer copy(g.ram[base:], saved)
		k, err := OpenKernel(g.mem, g.cr3, false, g.p)
		if err != nil {
			return
		}
		_, _ = k.Tasks(context.Background(), TaskOptions{Threads: true})
	})
}

// TestCmdline reads a process's arguments through its own page tables:
// two pages of them, the second not present (swapped out): the first
// page's strings, truncated.
func TestCmdline(t *testing.T) {
	g := newSynthGuest(t, realProfile(t), smallConfig(false, 11))
	addrs := addTasks(t, g, standardTasks)
	l, _ := resolveTaskLayout(g.p)
	// A user address space: its own PGD, the arguments on one page.
	kernelRoot := g.pt.root
	userRoot := g.pt.alloc()
	g.pt.root = userRoot
	argPA := g.alloc(PageSize, PageSize)
	const argVA = 0x7ffd12340000
	g.pt.mapPage(argVA, argPA, LevelPT, PTERW|PTEUser)
	g.pt.root = kernelRoot
	args := "/bin/app\x00--flag\x00value with space\x00"
	copy(g.ram[argPA+PageSize-PAddr(len(args)):], args)
	start := uint64(argVA + PageSize - len(args))

	mm := g.get64(g.pa(addrs[100] + l.mm))
	g.put64(g.pa(mm+l.mmPgd), g.directVA(userRoot))
	g.put64(g.pa(mm+l.mmArgStart), start)
	g.put64(g.pa(mm+l.mmArgEnd), start+uint64(len(args)))
	k := g.kernel()
	tasks, err := k.Tasks(context.Background(), TaskOptions{})
	require.NoError(t, err)
	var app Task
	for _, tk := range tasks {
		if tk.PID == 100 {
			app = tk
		}
	}
	got, truncated, err := k.Cmdline(app)
	require.NoError(t, err)
	assert.False(t, truncated)
	assert.Equal(t, []string{"/bin/app", "--flag", "value with space"}, got)

	// The rest of the arguments on the next page, which is not mapped.
	g.put64(g.pa(mm+l.mmArgEnd), start+uint64(len(args))+100)
	got, truncated, err = g.kernel().Cmdline(app)
	require.NoError(t, err)
	assert.True(t, truncated)
	assert.Equal(t, []string{"/bin/app", "--flag", "value with space"}, got)

	// A kernel thread has none; arguments that end before they start are
	// refused.
	got, _, err = k.Cmdline(Task{PID: 2, KernelThread: true})
	assert.NoError(t, err)
	assert.Nil(t, got)
	g.put64(g.pa(mm+l.mmArgEnd), start-1)
	_, _, err = g.kernel().Cmdline(app)
	assert.ErrorIs(t, err, ErrKernel)
}
