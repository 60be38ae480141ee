package checkpoint

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
	"github.com/kvmckpt/kvmckpt/introspect"
	"github.com/kvmckpt/kvmckpt/profiles"
	"github.com/kvmckpt/kvmckpt/writer"
)

// TestScanAgainstGuestTruth compares what kvmckpt finds from outside with
// what the guest itself reports (its /proc/kallsyms, /proc/kpageflags,
// /proc/meminfo and /proc/self/pagemap), on the machines the acceptance
// criteria name. It also checks that the profile built from guest memory is
// the profile built from the kernel image.
func TestScanAgainstGuestTruth(t *testing.T) {
	cases := []struct {
		name string
		cfg  vmtest.Config
	}{
		{"pc-1G-1cpu", vmtest.Config{Machine: "pc", MemMiB: 1024, CPUs: 1}},
		{"q35-3G-2cpu", vmtest.Config{Machine: "q35", MemMiB: 3072, CPUs: 2}},
		{"pc-1G-cpumax-la57", vmtest.Config{Machine: "pc", MemMiB: 1024, CPUs: 1, CPU: "max"}},
		{"pc-1G-cloud-kernel", vmtest.Config{Machine: "pc", MemMiB: 1024, CPUs: 1, Kernel: "cloud-amd64"}},
		{"q35-2G-2cpu-2numa", vmtest.Config{Machine: "q35", MemMiB: 2048, CPUs: 2, NUMANodes: 2}},
		// The version matrix (see guestConfigs).
		{"pc-1G-6.12", vmtest.Config{Machine: "pc", MemMiB: 1024, CPUs: 1, Kernel: "6.12-amd64"}},
		{"pc-1G-6.12-cloud", vmtest.Config{Machine: "pc", MemMiB: 1024, CPUs: 1, Kernel: "6.12-cloud-amd64"}},
		// 5-level paging on 6.12 too: the tasks, VMAs and cores of user
		// address spaces walked with five levels.
		{"pc-1G-6.12-la57", vmtest.Config{Machine: "pc", MemMiB: 1024, CPUs: 1, CPU: "max", Kernel: "6.12-amd64"}},
		{"pc-1G-qemu10", vmtest.Config{Machine: "pc", MemMiB: 1024, CPUs: 1, QEMU: "10.0"}},
		{"q35-2G-2cpu-qemu10-6.12", vmtest.Config{Machine: "q35", MemMiB: 2048, CPUs: 2, QEMU: "10.0", Kernel: "6.12-amd64"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := c.cfg
			cfg.Workload = vmtest.Workload{Churn: cfg.MemMiB / 2, Anon: 32, Tmpfs: 32, Truth: true,
				// One guest keeps a thread of /coretarget running on a
				// vCPU, for the core's registers from the vCPU.
				Spin: c.name == "q35-3G-2cpu"}
			g := vmtest.Boot(t, cfg)
			truth := g.Truth(t)
			ctx := context.Background()

			gst, err := openGuest(ctx, Target{QMP: g.QMPPath}, nil)
			require.NoError(t, err)
			defer gst.close()
			restore, err := gst.pause(ctx)
			require.NoError(t, err)
			defer restore(ctx)
			require.NoError(t, gst.mapRAM(ctx, false))
			regs, err := gst.sess.CPURegisters(ctx, 0)
			require.NoError(t, err)
			if c.cfg.CPU == "max" {
				require.True(t, regs.LA57(), "-cpu max must turn on 5-level paging")
			}
			// An empty store: the profile is built from guest memory.
			prof, err := gst.profile(ctx, ScanOptions{ProfileDir: t.TempDir()}, regs)
			require.NoError(t, err)
			k, err := introspect.OpenKernel(gst.mem, regs.CR3, regs.LA57(), prof)
			require.NoError(t, err)

			// Every symbol the guest shows is the profile's address plus
			// the KASLR slide.
			require.NotEmpty(t, truth.Symbols)
			for name, addr := range truth.Symbols {
				linked, ok := prof.Symbols[name]
				if !ok {
					continue
				}
				assert.Equal(t, addr, linked+k.Slide, "symbol %s: guest %#x, profile %#x + slide %#x", name, addr, linked, k.Slide)
			}
			for _, name := range []string{"_text", "node_data", "page_offset_base", "vmemmap_base", "init_top_pgt", "__per_cpu_offset"} {
				assert.Contains(t, truth.Symbols, name)
			}

			// The profile from guest memory is the profile from the image.
			kpath, err := vmtest.KernelPath(cfg.Kernel)
			require.NoError(t, err)
			fromImage, err := profiles.BuildFromImage(kpath)
			require.NoError(t, err)
			assert.Equal(t, fromImage.Banner, prof.Banner)
			assert.Equal(t, fromImage.Structs, prof.Structs, "struct layouts differ between image and memory")
			for name, a := range fromImage.Symbols {
				if b, ok := prof.Symbols[name]; ok {
					assert.Equal(t, a, b, "symbol %s", name)
				}
			}
			for name, v := range fromImage.Constants {
				if w, ok := prof.Constants[name]; ok && name != "PAGE_BUDDY_MAPCOUNT_VALUE" {
					assert.Equal(t, v, w, "constant %s", name)
				}
			}

			if !t.Failed() {
				vmtest.RecordMatrix(cfg, "profile: image = guest memory")
			}

			fp, err := k.WalkFree(ctx, introspect.WalkOptions{})
			require.NoError(t, err)
			for _, z := range fp.Zones {
				assert.True(t, z.Trusted, "zone %s not trusted: %s", z.Name, z.Reason)
			}
			assert.Empty(t, fp.Warnings)

			// The tasks: what the guest's /proc listed, read from outside
			// (kvmckpt ps --threads), on the same paused guest.
			checkTasks(t, k, truth)
			if !t.Failed() {
				vmtest.RecordMatrix(cfg, "ps --threads against /proc")
			}
			// A core of the guest's /coretarget, loaded by gdb.
			if checkCore(t, gst, k, cfg.Workload.Spin) {
				vmtest.RecordMatrix(cfg, "core of a guest process in gdb")
			}

			// Completeness: nearly all of the guest's free memory is found.
			memFree := truth.MemFreeKB / 4
			t.Logf("found %d free pages (buddy %d, per-CPU %d); guest: MemFree %d pages, kpageflags buddy %d; walk %v",
				fp.Pages(), fp.Buddy, fp.PCP, memFree, truth.BuddyPages, fp.Duration)
			assert.GreaterOrEqual(t, float64(fp.Pages()), 0.97*float64(memFree))

			// Safety: no page called free that the guest shows in use.
			// Free pages on per-CPU lists carry no flag at all. The
			// guest's snapshots were taken just before the pause and a
			// few seconds after it: a buddy page free at the pause is
			// free in one of them. A per-CPU page need not be: the lists
			// are last in, first out, so a page freed just after the
			// first snapshot (by the very reads that took it) is the
			// first one reused by the reads of the second. Those are few;
			// a wrong walk of the per-CPU lists would make most of them
			// pages in use.
			restore(ctx)
			truth = g.LaterTruth(t)
			var wrong, pcpLike, pcpReused uint64
			for pfn := range fp.Free.All() {
				switch {
				case vmtest.Contains(truth.Buddy, pfn):
				case truth.FreeOrFlagless(pfn):
					pcpLike++
				case fp.OnPCP.Test(pfn):
					t.Logf("pfn %#x was on a per-CPU list, the guest's kpageflags show it in use before and after (reused)", pfn)
					pcpReused++
				default:
					if wrong < 10 {
						t.Errorf("pfn %#x called free (buddy), the guest's kpageflags show it in use", pfn)
					}
					wrong++
				}
			}
			assert.Zero(t, wrong, "buddy pages wrongly called free")
			assert.LessOrEqual(t, pcpReused, fp.PCP/20+1, "per-CPU pages in use before and after the pause: more than reuse explains")
			t.Logf("%d free pages were not free buddy pages in the first snapshot (per-CPU pages: %d, reused: %d)", pcpLike, fp.PCP, pcpReused)

			// The data the workload keeps sits in pages marked used.
			for region, runs := range truth.Frames {
				require.NotEmpty(t, runs, region)
				for _, r := range runs {
					for pfn := r.Start; pfn < r.Start+r.Count; pfn++ {
						if fp.Free.Test(pfn) {
							t.Fatalf("pfn %#x holds the workload's %s data but is called free", pfn, region)
						}
					}
				}
			}
			if !t.Failed() {
				vmtest.RecordMatrix(cfg, "scan against /proc/kpageflags")
			}
		})
	}
}

// checkTasks compares the guest's tasks as kvmckpt reads them with the
// listing the workload printed from /proc: the same threads, with the same
// ids, parents, names and states (but for the workload's own threads,
// running as it read /proc), and the workload's command line. The guest is quiet
// between the listing and the pause: no task comes or goes.
func checkTasks(t *testing.T, k *introspect.Kernel, truth *vmtest.Truth) {
	t.Helper()
	require.NotEmpty(t, truth.Tasks, "the workload printed no task listing")
	tasks, err := k.Tasks(context.Background(), introspect.TaskOptions{Threads: true})
	require.NoError(t, err)
	got := map[int32]introspect.Task{}
	for _, tk := range tasks {
		got[tk.PID] = tk
	}
	ran := 0
	for tid, want := range truth.Tasks {
		tk, ok := got[tid]
		if !assert.True(t, ok, "thread %d (%s) of the guest's /proc not found", tid, want.Comm) {
			continue
		}
		assert.Equal(t, want.TGID, tk.TGID, "tid %d tgid", tid)
		assert.Equal(t, want.PPID, tk.PPID, "tid %d ppid", tid)
		if tk.KernelThread {
			// /proc shows a kernel thread's full name and a worker's
			// workqueue ("kworker/0:2-rcu_gp"); task->comm is its first
			// 15 bytes.
			assert.True(t, strings.HasPrefix(want.Comm, tk.Comm) && len(tk.Comm) > 0, "tid %d comm %q, /proc %q", tid, tk.Comm, want.Comm)
		} else {
			assert.Equal(t, want.Comm, tk.Comm, "tid %d comm", tid)
		}
		switch {
		case want.TGID == truth.Self:
			// The workload's own threads ran as it read /proc (its Go
			// runtime's too): their states then are not those at the
			// pause.
		case want.State != tk.State && (want.State == "R" || tk.State == "R"):
			// A kernel thread that ran around the listing (rcu_preempt
			// wakes every few milliseconds on another vCPU): a few are
			// allowed; a decoding error would show on many, and between
			// sleeping states.
			ran++
			t.Logf("tid %d (%s) was %s in the listing, %s at the pause", tid, want.Comm, want.State, tk.State)
		default:
			assert.Equal(t, want.State, tk.State, "tid %d (%s) state", tid, want.Comm)
		}
	}
	assert.LessOrEqual(t, ran, 3, "tasks running at the listing or at the pause, not both")
	for tid, tk := range got {
		if _, ok := truth.Tasks[tid]; ok {
			continue
		}
		if tk.TGID == truth.Self && tid != truth.Self {
			// The workload's Go runtime starts a thread when a
			// goroutine blocks in a system call: after its listing it
			// writes the rest of its truth to the console.
			t.Logf("thread %d (%s) of the workload started after its listing", tid, tk.Comm)
			continue
		}
		assert.Fail(t, "a thread /proc did not list", "kvmckpt found thread %d (%s), which the guest's /proc did not list", tid, tk.Comm)
	}
	self := got[truth.Self]
	// The workload's memory areas, from its mm's maple tree, against its
	// /proc/self/maps (which adds the vsyscall page, in no mm).
	vmas, err := k.VMAs(self.MM)
	require.NoError(t, err)
	var ranges [][2]uint64
	for _, v := range vmas {
		ranges = append(ranges, [2]uint64{v.Start, v.End})
	}
	want := truth.VMAs
	if n := len(want); n > 0 && want[n-1][0] == 0xffffffffff600000 {
		want = want[:n-1]
	}
	assert.Equal(t, want, ranges, "the workload's VMAs")
	args, truncated, err := k.Cmdline(self)
	require.NoError(t, err)
	assert.False(t, truncated)
	assert.Equal(t, truth.Cmdline, args, "the workload's command line")
	assert.False(t, self.KernelThread)
	assert.Greater(t, self.RSSPages, uint64(16<<20/4096), "the workload keeps more than 16 MiB")
	t.Logf("%d threads, as the guest's /proc listed them", len(tasks))
}

// checkCore writes a core of the guest's /coretarget from the paused
// guest and checks it in gdb (vmtest.CheckCore). It reports whether the
// core passed.
func checkCore(t *testing.T, g *guest, k *introspect.Kernel, spin bool) bool {
	t.Helper()
	ctx := context.Background()
	tasks, err := k.Tasks(ctx, introspect.TaskOptions{})
	require.NoError(t, err)
	var pid int32
	for _, tk := range tasks {
		if tk.Comm == vmtest.CoreTargetComm {
			pid = tk.PID
		}
	}
	require.NotZero(t, pid, "the guest runs no %s", vmtest.CoreTargetComm)
	regs, err := g.cpuRegisters(ctx)
	require.NoError(t, err)
	cpus := map[int]writer.CPU{}
	for _, r := range regs {
		require.True(t, r.HasGPR)
		cpus[r.CPU] = cpuState(r)
	}
	out := filepath.Join(t.TempDir(), "coretarget.core")
	res, err := writeCore(ctx, k, cpus, CoreOptions{PID: pid, Output: out})
	require.NoError(t, err)
	vmtest.CheckCore(t, out, pid, spin)
	// Most of each thread's 8 MiB stack was never touched: absent, not
	// written as zeros.
	assert.Greater(t, res.AbsentBytes, uint64(2*8<<20))
	assert.Less(t, res.PresentBytes, uint64(8<<20))
	if spin {
		// The spinner is on a vCPU when the guest pauses (unless a
		// kernel thread had the vCPU at that moment): its registers are
		// the vCPU's in user mode, or its stack's if it was in the
		// kernel. Either gives the frames CheckCore checks.
		t.Logf("first thread %d (%s): registers from %s", res.Threads[0].TID, res.Threads[0].Comm, res.Threads[0].Registers)
	}
	return !t.Failed()
}
