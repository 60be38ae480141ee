package introspect

import (
	"context"
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// processGuest is a synthetic guest with standardTasks and, for process
// 100: a kernel stack with user registers on top, TLS bases, an
// auxiliary vector, and two files on two mounts.
type processGuest struct {
	g          *synthGuest
	addrs      map[int32]uint64
	regsPA     PAddr  // the pt_regs at the top of 100's stack
	stackField PAddr  // task 100's task_struct.stack
	auxvPA     PAddr  // 100's mm->saved_auxv
	fileApp    uint64 // struct file of /bin/app
	fileData   uint64 // struct file of /mnt/data/x, on a second mount
	dentryBin  PAddr
}

func newProcessGuest(t testing.TB) *processGuest {
	t.Helper()
	g := newSynthGuest(t, realProfile(t), smallConfig(false, 7))
	pg := &processGuest{g: g, addrs: addTasks(t, g, standardTasks)}
	p := g.p
	off := func(st, f string) PAddr { return PAddr(p.Structs[st].Fields[f].Offset) }
	task := g.pa(pg.addrs[100])

	// A 16 KiB kernel stack, THREAD_SIZE aligned, registers at its top.
	stack := g.alloc(threadSize, threadSize)
	pg.stackField = task + off("task_struct", "stack")
	g.put64(pg.stackField, g.directVA(stack))
	pg.regsPA = stack + threadSize - PAddr(p.Structs["pt_regs"].Size)
	for i, n := range ptRegsNames {
		g.put64(pg.regsPA+off("pt_regs", n), uint64(0x1000+i))
	}
	g.put64(pg.regsPA+off("pt_regs", "cs"), 0x33)
	g.put64(pg.regsPA+off("pt_regs", "ss"), 0x2b)
	g.put64(pg.regsPA+off("pt_regs", "ip"), 0x401234)
	g.put64(pg.regsPA+off("pt_regs", "sp"), 0x7ffc00001000)
	g.put64(task+off("task_struct", "thread.fsbase"), 0x7f0000001000)
	g.put64(task+off("task_struct", "thread.gsbase"), 0x7f0000002000)

	// The auxiliary vector: AT_PAGESZ 4096, AT_NULL.
	mm := g.pa(g.get64(task + off("task_struct", "mm")))
	pg.auxvPA = mm + off("mm_struct", "saved_auxv")
	g.put64(pg.auxvPA, 6)
	g.put64(pg.auxvPA+8, 4096)

	// Mounts: the root (its own parent) and one on /mnt/data.
	direct := func(size uint64) (PAddr, uint64) {
		pa := g.alloc(size, 64)
		return pa, g.directVA(pa)
	}
	name := func(s string) uint64 {
		pa, va := direct(uint64(len(s)) + 1)
		copy(g.ram[pa:], s)
		return va
	}
	dentry := func(parent uint64, s string) (PAddr, uint64) {
		pa, va := direct(p.Structs["dentry"].Size)
		if parent == 0 {
			parent = va
		}
		g.put64(pa+off("dentry", "d_parent"), parent)
		g.put32(pa+off("dentry", "d_name.len"), uint32(len(s)))
		g.put64(pa+off("dentry", "d_name.name"), name(s))
		return pa, va
	}
	mount := func(parent uint64, root, point uint64) uint64 {
		pa, va := direct(p.Structs["mount"].Size)
		if parent == 0 {
			parent = va
		}
		g.put64(pa+off("mount", "mnt_parent"), parent)
		g.put64(pa+off("mount", "mnt_mountpoint"), point)
		g.put64(pa+off("mount", "mnt.mnt_root"), root)
		return va
	}
	file := func(m, d uint64) uint64 {
		pa, va := direct(p.Structs["file"].Size)
		g.put64(pa+off("file", "f_path.mnt"), m+uint64(off("mount", "mnt")))
		g.put64(pa+off("file", "f_path.dentry"), d)
		return va
	}
	_, root := dentry(0, "/")
	rootMnt := mount(0, root, root)
	var bin uint64
	pg.dentryBin, bin = dentry(root, "bin")
	_, app := dentry(bin, "app")
	pg.fileApp = file(rootMnt, app)
	_, mnt := dentry(root, "mnt")
	_, data := dentry(mnt, "data")
	_, dataRoot := dentry(0, "/")
	dataMnt := mount(rootMnt, dataRoot, data)
	_, x := dentry(dataRoot, "x")
	pg.fileData = file(dataMnt, x)
	return pg
}

func (pg *processGuest) task(t testing.TB, pid int32) Task {
	t.Helper()
	tasks, err := pg.g.kernel().Tasks(context.Background(), TaskOptions{Threads: true})
	require.NoError(t, err)
	for _, tk := range tasks {
		if tk.PID == pid {
			return tk
		}
	}
	t.Fatalf("no task %d", pid)
	return Task{}
}

// TestProcessParts reads what a core is made of from a synthetic guest:
// the saved registers in user_regs_struct order, the TLS bases, the
// auxiliary vector, paths across mounts, and the process's ids.
func TestProcessParts(t *testing.T) {
	pg := newProcessGuest(t)
	k := pg.g.kernel()
	app := pg.task(t, 100)

	r, err := k.SavedUserRegs(app)
	require.NoError(t, err)
	assert.Equal(t, uint64(0x1000), r.R15, "pt_regs' first word")
	assert.Equal(t, uint64(0x1000+10), r.AX)
	assert.Equal(t, uint64(0x401234), r.IP)
	assert.Equal(t, uint64(0x7ffc00001000), r.SP)
	assert.Equal(t, uint64(0x33), r.CS)
	assert.Equal(t, uint64(0x2b), r.SS)
	assert.Equal(t, uint64(0x7f0000001000), r.FSBase)
	assert.Equal(t, uint64(0x7f0000002000), r.GSBase)

	auxv, err := k.Auxv(app)
	require.NoError(t, err)
	assert.Equal(t, []uint64{6, 4096, 0, 0}, words(auxv))

	path, err := k.FilePath(VAddr(pg.fileApp))
	require.NoError(t, err)
	assert.Equal(t, "/bin/app", path)
	path, err = k.FilePath(VAddr(pg.fileData))
	require.NoError(t, err)
	assert.Equal(t, "/mnt/data/x", path, "a file on a mount")

	ids, err := k.ProcessIDs(app)
	require.NoError(t, err)
	assert.Equal(t, ProcessIDs{}, ids, "no process group or session set")

	_, err = k.SavedUserRegs(pg.task(t, 2))
	assert.ErrorContains(t, err, "kernel thread")
}

// TestProcessPartsHostile: what does not hold up is an error wrapping
// ErrKernel, never a register set or path to believe.
func TestProcessPartsHostile(t *testing.T) {
	for _, c := range []struct {
		name string
		edit func(pg *processGuest)
		read func(k *Kernel, pg *processGuest, app Task) error
		want string
	}{
		{"kernel selectors", func(pg *processGuest) {
			pg.g.put64(pg.regsPA+PAddr(pg.g.p.Structs["pt_regs"].Fields["cs"].Offset), 0x10)
		}, readRegs, "no user-mode frame"},
		{"stack not aligned", func(pg *processGuest) {
			pg.g.put64(pg.stackField, pg.g.get64(pg.stackField)+64)
		}, readRegs, "THREAD_SIZE"},
		{"auxv without AT_NULL", func(pg *processGuest) {
			f := pg.g.p.Structs["mm_struct"].Fields["saved_auxv"]
			for i := uint64(0); i < f.Size; i += 8 {
				pg.g.put64(pg.auxvPA+PAddr(i), 7)
			}
		}, func(k *Kernel, _ *processGuest, app Task) error { _, err := k.Auxv(app); return err }, "AT_NULL"},
		{"dentry cycle", func(pg *processGuest) {
			// bin's parent is app's: bin -> app -> bin, never the root.
			d := pg.g.p.Structs["dentry"].Fields["d_parent"].Offset
			app := pg.g.get64(pg.g.pa(pg.fileApp + pg.g.p.Structs["file"].Fields["f_path.dentry"].Offset))
			pg.g.put64(pg.dentryBin+PAddr(d), app)
		}, readPath, "PATH_MAX"},
		{"long name", func(pg *processGuest) {
			pg.g.put32(pg.dentryBin+PAddr(pg.g.p.Structs["dentry"].Fields["d_name.len"].Offset), 100000)
		}, readPath, "name of 100000 bytes"},
		{"user pointer", func(pg *processGuest) {
			pg.g.put64(pg.dentryBin+PAddr(pg.g.p.Structs["dentry"].Fields["d_parent"].Offset), 0x7fff0000)
		}, readPath, "no kernel pointer"},
	} {
		t.Run(c.name, func(t *testing.T) {
			pg := newProcessGuest(t)
			app := pg.task(t, 100)
			c.edit(pg)
			err := c.read(pg.g.kernel(), pg, app)
			require.Error(t, err)
			assert.ErrorIs(t, err, ErrKernel)
			assert.Contains(t, err.Error(), c.want)
		})
	}
}

func readRegs(k *Kernel, _ *processGuest, app Task) error {
	_, err := k.SavedUserRegs(app)
	return err
}

func readPath(k *Kernel, pg *processGuest, _ Task) error {
	_, err := k.FilePath(VAddr(pg.fileApp))
	return err
}

// FuzzProcessParts overwrites bytes of the synthetic process's
// structures: every read ends with a value or an error, never a panic or
// a hang.
func FuzzProcessParts(f *testing.F) {
	f.Add(uint16(0), []byte{0xff})
	f.Add(uint16(24), []byte{0, 0, 0, 0, 0, 0, 0, 0x80})
	pg := newProcessGuest(f)
	// The bytes the reads go through: the task, its stack top, its mm
	// and the file structures, all in the first backed megabytes.
	region := []PAddr{pg.g.pa(pg.addrs[100]), pg.regsPA, pg.auxvPA, pg.g.pa(pg.fileApp), pg.dentryBin, pg.g.pa(pg.fileData)}
	k := pg.g.kernel()
	app := pg.task(f, 100)
	f.Fuzz(func(t *testing.T, off uint16, data []byte) {
		if len(data) > 64 {
			return
		}
		base := region[int(off)%len(region)] + PAddr(off)%PAddr(4096)
		if int(base)+len(data) > len(pg.g.ram) {
			return
		}
		saved := append([]byte(nil), pg.g.ram[base:base+PAddr(len(data))]...)
		copy(pg.g.ram[base:], data)
		defer copy(pg.g.ram[base:], saved)
		_, _ = k.SavedUserRegs(app)
		_, _ = k.Auxv(app)
		_, _ = k.FilePath(VAddr(pg.fileApp))
		_, _ = k.FilePath(VAddr(pg.fileData))
		_, _ = k.ProcessIDs(app)
		_, _, _ = k.VDSO(app)
	})
}

func words(b []byte) []uint64 {
	var out []uint64
	for i := 0; i+8 <= len(b); i += 8 {
		out = append(out, binary.LittleEndian.Uint64(b[i:]))
	}
	return out
}
