package checkpoint

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
	"github.com/kvmckpt/kvmckpt/writer"
)

var writerGen = regexp.MustCompile(`KW WRITER OK gen=(\d+)`)

// writerGens returns the generations the workload's writer proved, in
// order, in serial.
func writerGens(serial string) []uint64 {
	var gens []uint64
	for _, m := range writerGen.FindAllStringSubmatch(serial, -1) {
		g, _ := strconv.ParseUint(m[1], 10, 64)
		gens = append(gens, g)
	}
	return gens
}

// waitWriterOK waits until the guest's writer has proved its pages n
// more times, and returns the last generation.
func waitWriterOK(t *testing.T, g *vmtest.Guest, n int) uint64 {
	t.Helper()
	from := len(g.Serial())
	re := regexp.MustCompile(`(?:KW WRITER OK gen=\d+[\s\S]*){` + strconv.Itoa(n) + `}`)
	_, _, err := g.WaitSerial(context.Background(), re, from, 2*time.Minute)
	require.NoError(t, err, "the workload's writer must go on proving its pages")
	gens := writerGens(g.Serial())
	return gens[len(gens)-1]
}

// TestIncrementalChain is the CI scenario of incremental checkpoints on a
// real guest whose workload keeps rewriting a working set (a known rate
// of change) and proves, every second, that its pages are all of one
// moment (its generation): a whole checkpoint, two children, each
// restored into a new QEMU gives the guest at its own moment with its
// data verified; a child saved from a restored guest restores too; the
// flat file of the chain restores exactly what the chain does; a parent
// that is gone is a clear error, found again with Parents.
func TestIncrementalChain(t *testing.T) {
	ctx := context.Background()
	cfg := vmtest.Config{Machine: "pc", MemMiB: 1024, CPUs: 1}
	cfg.Workload = vmtest.Workload{Churn: 256, Anon: 32, Tmpfs: 32, Text: 16, Interval: 1, WSet: 64, Rate: 4}
	src := vmtest.Boot(t, cfg)
	src.WaitReady(t)
	waitWriterOK(t, src, 1)
	dir := t.TempDir()
	saveAs := func(g *vmtest.Guest, name, parent string, live bool) (*SaveResult, uint64) {
		t.Helper()
		// The generation of the save's moment is at least the last one
		// the writer proved before it (a live save's moment is later).
		gens := writerGens(g.Serial())
		res, err := Save(ctx, SaveOptions{ScanOptions: ScanOptions{QMP: g.QMPPath, ProfileDir: dir}, Output: filepath.Join(dir, name), Parent: parent, Live: live})
		require.NoError(t, err)
		assert.Equal(t, "running", res.GuestState)
		t.Logf("%s: %d pages saved of %d, %s, pause %d ms; parent %+v", name, res.PagesSaved, res.PagesTotal, fmtMiB(res.BytesWritten), res.PauseMS, res.Parent)
		return res, gens[len(gens)-1]
	}
	save := func(g *vmtest.Guest, name, parent string) (*SaveResult, uint64) {
		t.Helper()
		return saveAs(g, name, parent, false)
	}
	base, _ := save(src, "base.kvmckpt", "")
	waitWriterOK(t, src, 3)
	d1, a1 := save(src, "d1.kvmckpt", filepath.Join(dir, "base.kvmckpt"))
	waitWriterOK(t, src, 4)
	d2, a2 := save(src, "d2.kvmckpt", filepath.Join(dir, "d1.kvmckpt"))
	// A live child of d2: pre-copy rounds while the writer writes, then
	// only the pages that differ from what d2 restores.
	waitWriterOK(t, src, 2)
	dl, al := saveAs(src, "dlive.kvmckpt", filepath.Join(dir, "d2.kvmckpt"), true)
	src.Close()
	require.NotNil(t, dl.Live)
	require.NotNil(t, dl.Parent)
	assert.Equal(t, 3, dl.Parent.Depth)
	assert.Less(t, dl.PagesSaved, base.PagesSaved/2, "a live child stores what changed, not what is in use")
	assert.Equal(t, dl.PagesSaved, dl.Parent.PagesChanged)

	for _, d := range []*SaveResult{d1, d2} {
		require.NotNil(t, d.Parent)
		assert.Equal(t, d.PagesSaved, d.Parent.PagesChanged)
		assert.Positive(t, d.PagesSaved, "the writer changed pages")
		// 4 MiB/s into a 64 MiB set for a few seconds, and the kernel's
		// own changes: a fraction of what the guest has in use.
		assert.Less(t, d.PagesSaved, base.PagesSaved/2, "a child stores what changed, not what is in use")
		assert.Less(t, d.BytesWritten, base.BytesWritten/2)
	}
	assert.Equal(t, 1, d1.Parent.Depth)
	assert.Equal(t, 2, d2.Parent.Depth)
	require.NoError(t, Verify(filepath.Join(dir, "d2.kvmckpt"), nil, nil, nil))

	// restoreAt restores a link into a new QEMU and checks that the guest
	// is of the link's moment: its data verified, its writer's pages all
	// of one generation, not before the save's and, if before is not
	// zero, before that.
	restoreAt := func(name string, after, before uint64) *vmtest.Guest {
		t.Helper()
		tcfg := cfg
		tcfg.Incoming = true
		dst := vmtest.Boot(t, tcfg)
		res, err := Restore(ctx, RestoreOptions{Input: filepath.Join(dir, name), QMP: dst.QMPPath, Resume: true})
		require.NoError(t, err)
		t.Logf("restore %s: %+v", name, *res)
		_, _, err = dst.WaitSerial(ctx, regexp.MustCompile(`KW WRITER OK[\s\S]*KW VERIFY OK`), 0, 2*time.Minute)
		require.NoError(t, err, "%s: the restored guest does not verify", name)
		assert.NotContains(t, dst.Serial(), "WRITER FAIL")
		assert.NotRegexp(t, kernelTrouble, dst.Serial())
		g := writerGens(dst.Serial())[0]
		assert.GreaterOrEqual(t, g, after, "%s: the guest is from before the save", name)
		if before != 0 {
			assert.Less(t, g, before, "%s: the guest is from after the save (a later link's pages)", name)
		}
		return dst
	}
	dst2 := restoreAt("d2.kvmckpt", a2, 0)
	// A child of d2 saved from the guest restored from it.
	waitWriterOK(t, dst2, 2)
	_, a3 := save(dst2, "d3.kvmckpt", filepath.Join(dir, "d2.kvmckpt"))
	dst2.Close()
	restoreAt("d1.kvmckpt", a1, a2).Close()
	restoreAt("d3.kvmckpt", a3, 0).Close()
	restoreAt("dlive.kvmckpt", al, 0).Close()

	// Flat: the same pages and device state as the chain, standalone.
	flat := filepath.Join(dir, "flat.kvmckpt")
	fres, err := Flatten(ctx, FlattenOptions{Input: filepath.Join(dir, "d2.kvmckpt"), Output: flat})
	require.NoError(t, err)
	assert.Equal(t, 3, fres.Links)
	require.NoError(t, Verify(flat, nil, nil, nil))
	chainRAM, chainDev := restoreToMemory(t, filepath.Join(dir, "d2.kvmckpt"))
	flatRAM, flatDev := restoreToMemory(t, flat)
	assert.True(t, bytes.Equal(chainRAM, flatRAM), "flat file restores other pages than its chain")
	assert.Equal(t, chainDev, flatDev)
	info, err := Inspect(flat, nil, nil)
	require.NoError(t, err)
	assert.Empty(t, info.Chain, "a flat file has no parent")

	// The base gone: restoring d2 fails before it touches a target; found
	// again where it was moved.
	moved := filepath.Join(t.TempDir(), "renamed.kvmckpt")
	require.NoError(t, os.Rename(filepath.Join(dir, "base.kvmckpt"), moved))
	_, err = Restore(ctx, RestoreOptions{Input: filepath.Join(dir, "d2.kvmckpt"), QMP: filepath.Join(dir, "no-such.qmp")})
	require.ErrorIs(t, err, ErrInvalid)
	require.ErrorContains(t, err, "base.kvmckpt")
	require.NoError(t, Verify(filepath.Join(dir, "d2.kvmckpt"), nil, []string{moved}, nil))
	info, err = Inspect(filepath.Join(dir, "d2.kvmckpt"), nil, nil)
	require.NoError(t, err)
	assert.Contains(t, info.ChainError, "base.kvmckpt")
}

// restoreToMemory restores the chain of path into memory, as a restore
// target's RAM file would get it, and returns it and the device state.
func restoreToMemory(t *testing.T, path string) ([]byte, []byte) {
	t.Helper()
	c, err := writer.OpenChain(path, writer.ChainOptions{})
	require.NoError(t, err)
	defer c.Close()
	h := c.Header()
	var ram []byte
	for _, r := range h.Regions {
		ram = append(ram, make([]byte, r.Size)...)
	}
	mem := [][]byte{}
	off := uint64(0)
	for _, r := range h.Regions {
		mem = append(mem, ram[off:off+r.Size])
		off += r.Size
	}
	require.NoError(t, c.RestorePages(mem, writer.RestoreOptions{}))
	require.NoError(t, c.FillUnsaved(mem))
	dev, err := io.ReadAll(c.DeviceState())
	require.NoError(t, err)
	return ram, dev
}

func fmtMiB(n int64) string { return strconv.FormatFloat(float64(n)/(1<<20), 'f', 1, 64) + " MiB" }
