package vmtest

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"regexp"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-qemu/qmp"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMain(m *testing.M) { Main(m) }

func TestParseTruth(t *testing.T) {
	serial := "[    1.0] boot noise\n" +
		"KW MEM when=kept total_kb=1000 free_kb=800\n" +
		"KW SYM _text ffffffffb4e00000\n" +
		"KW PFN anon 100+10 200+2\n" +
		"KW BUDDY 10+5 20+1\n" +
		"KW BUDDY 40+4\n" +
		"KW NOFLAGS 30+2\n" +
		"KW PAGES max_pfn=262144 buddy=10 noflags=2\n" +
		"KW TASK 1 1 0 S \"init\"\n" +
		"KW TASK 1 7 0 R \"init (x)\"\n" +
		"KW TASKS self=1 tid=7\n" +
		"KW VMA 00400000-00401000\n" +
		"KW VMA 7ffd00000000-7ffd00021000\n" +
		"KW CMDLINE \"/init\" \"a b\"\n" +
		"KW TRUTH END\n"
	tr, err := ParseTruth(serial)
	require.NoError(t, err)
	assert.Equal(t, TruthTask{TGID: 1, TID: 7, PPID: 0, State: "R", Comm: "init (x)"}, tr.Tasks[7])
	assert.Len(t, tr.Tasks, 2)
	assert.Equal(t, [2]int32{1, 7}, [2]int32{tr.Self, tr.SelfTID})
	assert.Equal(t, []string{"/init", "a b"}, tr.Cmdline)
	assert.Equal(t, [][2]uint64{{0x400000, 0x401000}, {0x7ffd00000000, 0x7ffd00021000}}, tr.VMAs)
	assert.Equal(t, uint64(0xffffffffb4e00000), tr.Symbols["_text"])
	assert.Equal(t, []Run{{0x10, 5}, {0x20, 1}, {0x40, 4}}, tr.Buddy)
	assert.Equal(t, []Run{{0x100, 0x10}, {0x200, 2}}, tr.Frames["anon"])
	assert.Equal(t, uint64(262144), tr.MaxPFN)
	assert.Equal(t, uint64(800), tr.MemFreeKB)
	assert.True(t, Contains(tr.Buddy, 0x14))
	assert.False(t, Contains(tr.Buddy, 0x15))
	assert.True(t, Contains(tr.Buddy, 0x43))
	assert.Nil(t, tr.Later)

	later, err := ParseTruth(serial + "KW READY\nKW BUDDY2 15+1\nKW NOFLAGS2 50+1\nKW PAGES2 buddy=1\nKW TRUTH2 END\n")
	require.NoError(t, err)
	require.NotNil(t, later.Later)
	assert.True(t, later.FreeOrFlagless(0x15), "free in the later snapshot")
	assert.True(t, later.FreeOrFlagless(0x30), "flagless in the first")
	assert.False(t, later.FreeOrFlagless(0x16))
	assert.Equal(t, tr.Buddy, later.Buddy, "the first snapshot stays as it was")

	for name, bad := range map[string]string{
		"no end":         "KW BUDDY 1+1\nKW PAGES buddy=1\n",
		"count mismatch": "KW BUDDY 1+2\nKW PAGES buddy=1 noflags=0\nKW TRUTH END\n",
		"bad run":        "KW BUDDY 1-2\nKW TRUTH END\n",
		"bad symbol":     "KW SYM x zz\nKW TRUTH END\n",
	} {
		t.Run(name, func(t *testing.T) {
			_, err := ParseTruth(bad)
			assert.Error(t, err)
		})
	}
}

// qmpRun sends one command and decodes its "return".
func qmpRun(t *testing.T, mon *qmp.SocketMonitor, cmd string, ret any) {
	t.Helper()
	raw, err := mon.Run([]byte(`{"execute":"` + cmd + `"}`))
	require.NoError(t, err, cmd)
	if ret != nil {
		var resp struct{ Return json.RawMessage }
		require.NoError(t, json.Unmarshal(raw, &resp))
		require.NoError(t, json.Unmarshal(resp.Return, ret), cmd)
	}
}

// TestBootPauseReadResume is the test bed's end-to-end check: a Debian
// guest boots, its workload gets ready, QMP pauses and resumes it, and its
// memory is readable through the RAM file.
func TestBootPauseReadResume(t *testing.T) {
	g := Boot(t, Config{MemMiB: 512, Workload: Workload{Churn: 64, Anon: 16, Tmpfs: 16, Interval: 1}})
	g.WaitReady(t)

	mon, err := qmp.NewSocketMonitor("unix", g.QMPPath, 5*time.Second)
	require.NoError(t, err)
	require.NoError(t, mon.Connect())
	defer mon.Disconnect()

	var status struct {
		Running bool
		Status  string
	}
	qmpRun(t, mon, "query-status", &status)
	require.True(t, status.Running, "status %q", status.Status)
	qmpRun(t, mon, "stop", nil)
	qmpRun(t, mon, "query-status", &status)
	require.Equal(t, "paused", status.Status)

	// While paused, the guest prints nothing.
	before := len(g.Serial())
	time.Sleep(1500 * time.Millisecond)
	assert.Equal(t, before, len(g.Serial()), "paused guest kept printing")

	f, err := os.Open(g.RAMPath)
	require.NoError(t, err)
	defer f.Close()
	st, err := f.Stat()
	require.NoError(t, err)
	require.Equal(t, int64(512<<20), st.Size())
	ram, err := syscall.Mmap(int(f.Fd()), 0, int(st.Size()), syscall.PROT_READ, syscall.MAP_SHARED)
	require.NoError(t, err)
	defer syscall.Munmap(ram)
	i := bytes.Index(ram, []byte("Linux version 6.1"))
	require.GreaterOrEqual(t, i, 0, "kernel banner not found in guest RAM")
	t.Logf("banner at guest-physical %#x: %q", i, ram[i:i+bytes.IndexByte(ram[i:], '\n')])

	qmpRun(t, mon, "cont", nil)
	qmpRun(t, mon, "query-status", &status)
	require.True(t, status.Running)
	_, _, err = g.WaitSerial(context.Background(), regexp.MustCompile(`KW VERIFY OK`), before, time.Minute)
	require.NoError(t, err, "resumed guest does not verify its data")
	assert.NotContains(t, g.Serial(), "VERIFY FAIL")
}

// TestTruth checks the workload's ground truth against what the guest
// reports elsewhere.
func TestTruth(t *testing.T) {
	g := Boot(t, Config{MemMiB: 512, Workload: Workload{Churn: 128, Anon: 8, Tmpfs: 4, Truth: true}})
	tr := g.Truth(t)
	for _, s := range []string{"_text", "linux_banner", "node_data", "page_offset_base", "vmemmap_base", "init_top_pgt"} {
		require.NotZero(t, tr.Symbols[s], s)
	}
	assert.Zero(t, tr.Symbols["_text"]%(2<<20), "_text is 2 MiB aligned")
	assert.Equal(t, uint64(8*256), CountRuns(tr.Frames["anon"]))
	assert.Equal(t, uint64(4*256), CountRuns(tr.Frames["tmpfs"]))
	assert.Equal(t, uint64(512<<20)/4096, tr.MaxPFN)
	// Free buddy pages make up most of MemFree (the rest sits on per-CPU
	// lists, which kpageflags shows without a flag).
	freePages := tr.MemFreeKB / 4
	assert.InDelta(t, float64(freePages), float64(tr.BuddyPages), float64(freePages)/10)
	for _, r := range tr.Frames["anon"] {
		assert.False(t, Contains(tr.Buddy, r.Start), "kept page %#x is free", r.Start)
	}
}

func TestLeftovers(t *testing.T) {
	RequiresQEMU(t)
	g, err := Start(context.Background(), Config{MemMiB: 128, Incoming: true})
	require.NoError(t, err)
	require.Contains(t, Leftovers(), "RAM file "+g.RAMPath)
	require.NoError(t, g.Close())
	require.Empty(t, Leftovers())
	_, err = os.Stat(g.RAMPath)
	require.True(t, os.IsNotExist(err))
	require.Error(t, syscall.Kill(g.PID, 0), "qemu still alive")
}
