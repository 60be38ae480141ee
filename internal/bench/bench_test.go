package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
)

func TestMain(m *testing.M) {
	// The bench runs its baselines as child processes of its own binary,
	// which under `go test` is the test binary.
	if isChild, code := childMain(); isChild {
		os.Exit(code)
	}
	vmtest.Main(m)
}

// TestSmoke runs `go run ./internal/bench -smoke -qemu 10.0` end to end: a
// 512 MiB guest under QEMU 10 that filled and freed more than half its
// RAM, the four saves (QEMU's stream, QEMU's mapped-ram, naive, kvmckpt),
// the disk measurement, the three restores and their verification.
func TestSmoke(t *testing.T) {
	vmtest.RequiresQEMU(t)
	dir := t.TempDir()
	out, chart := filepath.Join(dir, "bench.json"), filepath.Join(dir, "bench.png")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var stdout bytes.Buffer
	start := time.Now()
	r, err := run(ctx, &stdout, t.Output(), []string{"-smoke", "-qemu", "10.0", "-out", out, "-png", chart})
	t.Logf("smoke run took %v\n%s", time.Since(start).Round(time.Millisecond), stdout.String())
	require.NoError(t, err)
	require.NotNil(t, r.Result)
	p := r.Result

	saves := map[string]summary{}
	for _, tool := range tools {
		s, ok := findSummary(p.Summary, opSave, tool)
		require.True(t, ok, "no %s save", tool)
		saves[tool] = s
		assert.Equal(t, 1, s.Runs, tool)
		assert.Positive(t, s.PauseMS.Median, "%s pause", tool)
		assert.LessOrEqual(t, s.PauseMS.Median, s.TotalMS.Median+1, "%s: the guest cannot be paused longer than the tool ran", tool)
		assert.Less(t, s.TotalMS.Median, float64(time.Minute/time.Millisecond), "%s total", tool)
		assert.Positive(t, s.Allocated.Median, "%s bytes", tool)
		assert.Positive(t, s.ToolCPUMS.Median, "%s CPU", tool)
		assert.Positive(t, s.ToolMaxRSS.Median, "%s RSS", tool)
		assert.GreaterOrEqual(t, s.QEMUCPUMS.Median, 0.0, "%s QEMU CPU", tool)
	}
	churned := float64(p.Workload.ChurnMiB) * (1 << 20)
	q, n, k := saves[toolQEMU], saves[toolNaive], saves[toolKvmckpt]
	// The premise: QEMU's save carries the freed pages, which are not zero.
	assert.Greater(t, q.Allocated.Median, churned, "QEMU's own save should hold the freed, non-zero pages")
	assert.Greater(t, saves[toolMappedRAM].Allocated.Median, churned, "QEMU's mapped-ram save should hold the freed, non-zero pages")
	assert.Greater(t, n.Allocated.Median, churned, "the naive copy should hold the freed, non-zero pages")
	assert.Greater(t, n.Apparent.Median, float64(p.Workload.MemMiB)*(1<<20), "the naive copy is as long as RAM")
	assert.Less(t, n.Allocated.Median, n.Apparent.Median, "the naive copy is sparse")
	// The claim: kvmckpt leaves them out.
	assert.Less(t, k.Allocated.Median, q.Allocated.Median/2, "kvmckpt must write far fewer bytes than QEMU's own save")
	assert.Contains(t, p.KvmckptSave, "pages_saved")
	assert.Less(t, p.KvmckptSave["pages_saved"].Median, p.KvmckptSave["pages_total"].Median/2)

	for _, tool := range []string{toolQEMU, toolMappedRAM, toolKvmckpt} {
		s, ok := findSummary(p.Summary, opRestore, tool)
		require.True(t, ok, "no %s restore", tool)
		assert.Equal(t, 1, s.Verified, "%s's restored guest must verify its data", tool)
		assert.Positive(t, s.TotalMS.Median, tool)
		assert.GreaterOrEqual(t, s.WithStartMS.Median, s.TotalMS.Median, tool)
	}
	require.Len(t, p.Disk.Rows, 4, "kvmckpt's and QEMU's sizes, buffered and direct")
	for _, d := range p.Disk.Rows {
		assert.Positive(t, d.MiBps.Median, "disk bandwidth")
		assert.Positive(t, d.Fraction.Median, "%s's share of the disk", d.Tool)
	}
	assert.Empty(t, p.Failures)

	for _, want := range []string{"## Save", "## Restore", "## The disk's limit", toolNames[toolQEMU], toolNames[toolMappedRAM], toolNames[toolKvmckpt], "(Debian 1:10.0", "1/1"} {
		assert.Contains(t, stdout.String(), want)
	}
	b, err := os.ReadFile(out)
	require.NoError(t, err)
	var back report
	require.NoError(t, json.Unmarshal(b, &back))
	assert.Len(t, back.Result.Measurements, 7, "four saves and three restores")
	f, err := os.Open(chart)
	require.NoError(t, err)
	defer f.Close()
	_, err = png.Decode(f)
	assert.NoError(t, err)
}

func TestParseProcStat(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want procTimes
		err  bool
	}{
		{
			name: "qemu",
			in:   "4242 (qemu-system-x86) S 1 4242 4242 0 -1 4194624 1 0 0 0 150 30 7 3 20 0 4 0 100 1 1\n",
			want: procTimes{Self: 1800 * time.Millisecond, Children: 100 * time.Millisecond},
		},
		{
			name: "name with spaces and parentheses",
			in:   "7 (a) b (c)) R 1 7 7 0 -1 0 0 0 0 0 1 2 3 4 20 0 1 0 5 6 7",
			want: procTimes{Self: 30 * time.Millisecond, Children: 70 * time.Millisecond},
		},
		{name: "truncated", in: "7 (x) R 1 2 3", err: true},
		{name: "no name", in: "7 x R", err: true},
		{name: "not a number", in: "7 (x) R 1 7 7 0 -1 0 0 0 0 0 a 2 3 4", err: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseProcStat(strings.NewReader(tt.in))
			if tt.err {
				assert.ErrorIs(t, err, errProcStat)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
			assert.Equal(t, tt.want.Self+tt.want.Children, got.Total())
		})
	}
}

func TestReadProcTimesSelf(t *testing.T) {
	if _, err := readProcTimes(os.Getpid()); err != nil {
		t.Fatal(err)
	}
	if _, err := readProcTimes(-1); err == nil {
		t.Fatal("pid -1 must fail")
	}
}

func TestSummarize(t *testing.T) {
	tests := []struct {
		in   []float64
		want stat
	}{
		{nil, stat{}},
		{[]float64{5}, stat{Median: 5, Min: 5, Max: 5, N: 1}},
		{[]float64{9, 1, 5}, stat{Median: 5, Min: 1, Max: 9, N: 3}},
		{[]float64{4, 1, 3, 2}, stat{Median: 2.5, Min: 1, Max: 4, N: 4}},
	}
	for _, tt := range tests {
		in := append([]float64(nil), tt.in...)
		assert.Equal(t, tt.want, summarize(tt.in), "%v", tt.in)
		assert.Equal(t, in, tt.in, "summarize must not reorder its input")
	}
}

func TestCell(t *testing.T) {
	assert.Equal(t, "—", cell(stat{}, 1, 0))
	assert.Equal(t, "12", cell(stat{Median: 12.4, Min: 12.4, Max: 12.4, N: 1}, 1, 0))
	assert.Equal(t, "12 (10–15)", cell(stat{Median: 12.4, Min: 10, Max: 15, N: 3}, 1, 0))
	assert.Equal(t, "1.5", cell(stat{Median: 1.5 * (1 << 20), Min: 1.5 * (1 << 20), Max: 1.52 * (1 << 20), N: 3}, 1<<20, 1))
	assert.Equal(t, "25% (20–30%)", pct(stat{Median: 0.25, Min: 0.2, Max: 0.3, N: 3}))
	assert.Equal(t, "0.25×", times(0.25))
	assert.Equal(t, "—", times(0))
}

func TestParseMountinfo(t *testing.T) {
	const mountinfo = `22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /dev/shm rw,nosuid,nodev shared:2 - tmpfs tmpfs rw
24 22 0:22 / /var/tmp/my\040dir rw shared:3 - xfs /dev/vdb rw
garbage line
25 22 0:23 / /var/tmpfoo rw - tmpfs tmpfs rw
`
	tests := []struct {
		path string
		want mountInfo
	}{
		{"/var/tmp/x", mountInfo{"/", "ext4", "/dev/vda"}},
		{"/dev/shm/f", mountInfo{"/dev/shm", "tmpfs", "tmpfs"}},
		{"/dev/shm", mountInfo{"/dev/shm", "tmpfs", "tmpfs"}},
		{"/var/tmp/my dir/a", mountInfo{"/var/tmp/my dir", "xfs", "/dev/vdb"}},
		{"/var/tmpfoo/a", mountInfo{"/var/tmpfoo", "tmpfs", "tmpfs"}},
	}
	for _, tt := range tests {
		got, err := parseMountinfo(strings.NewReader(mountinfo), tt.path)
		require.NoError(t, err, tt.path)
		assert.Equal(t, tt.want, got, tt.path)
	}
	_, err := parseMountinfo(strings.NewReader(""), "/x")
	assert.Error(t, err)
}

func TestParseLoadavg(t *testing.T) {
	assert.Equal(t, 7.91, parseLoadavg("7.91 5.45 5.14 3/512 18344\n"))
	assert.Equal(t, -1.0, parseLoadavg(""))
	assert.Equal(t, -1.0, parseLoadavg("x y"))
}

// writeAtRecorder records WriteAt calls.
type writeAtRecorder struct {
	writes [][2]int64 // offset, length
	fail   bool
}

func (w *writeAtRecorder) WriteAt(p []byte, off int64) (int, error) {
	if w.fail {
		return 0, errors.New("disk full")
	}
	w.writes = append(w.writes, [2]int64{off, int64(len(p))})
	return len(p), nil
}

func TestWriteNonZero(t *testing.T) {
	page := func(v byte) []byte {
		p := make([]byte, blockSize)
		if v != 0 {
			p[blockSize-1] = v // non-zero only at the very end
		}
		return p
	}
	cat := func(ps ...[]byte) []byte { return bytes.Join(ps, nil) }
	tests := []struct {
		name string
		in   []byte
		want [][2]int64
	}{
		{"all zero", cat(page(0), page(0)), nil},
		{"all data", cat(page(1), page(2)), [][2]int64{{1000, 2 * blockSize}}},
		{"runs", cat(page(1), page(0), page(2), page(3), page(0)), [][2]int64{{1000, blockSize}, {1000 + 2*blockSize, 2 * blockSize}}},
		{"data at the end", cat(page(0), page(1)), [][2]int64{{1000 + blockSize, blockSize}}},
		{"short last block", append(page(0), 0, 0, 5), [][2]int64{{1000 + blockSize, 3}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var w writeAtRecorder
			n, err := writeNonZero(&w, tt.in, 1000)
			require.NoError(t, err)
			assert.Equal(t, tt.want, w.writes)
			var total int64
			for _, x := range tt.want {
				total += x[1]
			}
			assert.Equal(t, total, n)
		})
	}
	_, err := writeNonZero(&writeAtRecorder{fail: true}, page(1), 0)
	assert.Error(t, err)
}

func TestSparseCopy(t *testing.T) {
	dir := t.TempDir()
	const size = 64 * blockSize
	src, err := os.Create(filepath.Join(dir, "src"))
	require.NoError(t, err)
	defer src.Close()
	require.NoError(t, src.Truncate(size)) // all hole
	data := bytes.Repeat([]byte("kvmckpt!"), blockSize/8)
	for _, blk := range []int64{0, 1, 7, 40, 63} {
		_, err := src.WriteAt(data, blk*blockSize)
		require.NoError(t, err)
	}
	// Written zeros: data, not a hole, yet left out of the copy.
	_, err = src.WriteAt(make([]byte, 4*blockSize), 20*blockSize)
	require.NoError(t, err)

	dst, err := os.Create(filepath.Join(dir, "dst"))
	require.NoError(t, err)
	defer dst.Close()
	n, err := sparseCopy(context.Background(), dst, src, size)
	require.NoError(t, err)
	assert.Equal(t, int64(5*blockSize), n)
	want, err := os.ReadFile(src.Name())
	require.NoError(t, err)
	got, err := os.ReadFile(dst.Name())
	require.NoError(t, err)
	assert.True(t, bytes.Equal(want, got), "copy differs")
	var st unix.Stat_t
	require.NoError(t, unix.Fstat(int(dst.Fd()), &st))
	assert.Less(t, st.Blocks*512, int64(size), "copy is not sparse")

	_, err = sparseCopy(context.Background(), dst, src, size+1)
	assert.Error(t, err, "size not a multiple of the block size")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err = sparseCopy(ctx, dst, src, size)
	assert.ErrorIs(t, err, context.Canceled)
}

func TestDiskBandwidth(t *testing.T) {
	for _, mode := range []string{diskBuffered, diskDirect} {
		t.Run(mode, func(t *testing.T) {
			dir := t.TempDir()
			d, err := diskBandwidth(dir, 8<<20, mode)
			if errors.Is(err, unix.EINVAL) && mode == diskDirect {
				t.Skipf("%s does not take O_DIRECT: %v", dir, err)
			}
			require.NoError(t, err)
			assert.Equal(t, int64(8<<20), d.Bytes)
			assert.Equal(t, mode, d.Mode)
			assert.Positive(t, d.MiBps())
			assert.InDelta(t, d.MS, d.WriteMS+d.SyncMS, 1)
			left, err := os.ReadDir(dir)
			require.NoError(t, err)
			assert.Empty(t, left, "the test file must be removed")
		})
	}
}

func TestNewWorkload(t *testing.T) {
	c := config{Keep: 0.1, Text: 0.1, Interval: 5, CPUs: 2, Machine: "q35"}
	w := newWorkload(c, 2048, 0.6)
	assert.Equal(t, workload{MemMiB: 2048, ChurnMiB: 1229, AnonMiB: 102, TmpfsMiB: 102, TextMiB: 205, IntervalS: 5, CPUs: 2, Machine: "q35"}, w)
	assert.Equal(t, "q35", w.guest().Machine)
	// 90% of 1 GiB does not fit beside the guest's kernel and workload.
	assert.Equal(t, 1024-churnReserve, newWorkload(c, 1024, 0.9).ChurnMiB)
	assert.Equal(t, 0, newWorkload(c, 1024, 0).ChurnMiB)
}

// TestSmokeLive runs the live bench on a small guest whose writer works
// at 50 MiB/s: every tool saves it, the live saves in rounds, and the
// tables and the targets' lines come out.
func TestSmokeLive(t *testing.T) {
	vmtest.RequiresQEMU(t)
	out := filepath.Join(t.TempDir(), "live.json")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var stdout bytes.Buffer
	r, err := run(ctx, &stdout, t.Output(), []string{"-live", "-smoke", "-out", out})
	t.Logf("%s", stdout.String())
	require.NoError(t, err)
	require.Len(t, r.Live, 1)
	p := r.Live[0]
	assert.Equal(t, 50, p.RateMiBps)
	assert.Positive(t, p.MeasuredMiBps, "the guest's writer runs")
	assert.Empty(t, p.Failures)
	for _, tool := range []string{liveStop, livePredict, liveNoPredict, liveQEMU, liveDisk} {
		m := liveMedian(p, tool)
		require.Equal(t, 1, m.n, tool)
		assert.Positive(t, m.PauseMS, tool)
		assert.LessOrEqual(t, m.PauseMS, m.TotalMS+1, "%s: paused longer than it ran", tool)
		assert.Positive(t, m.Written, tool)
		assert.Positive(t, m.Allocated, tool)
	}
	for _, tool := range []string{livePredict, liveNoPredict} {
		m := liveMedian(p, tool)
		assert.GreaterOrEqual(t, m.Rounds, int64(2), tool)
		assert.NotEmpty(t, m.StopReason, tool)
		assert.Positive(t, m.FinalPages, "%s: the writer dirties pages in the pause's round", tool)
	}
	assert.Positive(t, liveMedian(p, livePredict).DeferredPages, "prediction defers the writer's pages")
	assert.Positive(t, liveMedian(p, liveQEMU).Rounds, "QEMU reports its iterations")
	for _, want := range []string{"## Live saves", livePredict, liveQEMU, "- 50 MiB/s: pause"} {
		assert.Contains(t, stdout.String(), want)
	}
	b, err := os.ReadFile(out)
	require.NoError(t, err)
	var back report
	require.NoError(t, json.Unmarshal(b, &back))
	assert.Len(t, back.Live, 1)
}

func TestParseFlags(t *testing.T) {
	c, err := parseFlags(nil, &bytes.Buffer{})
	require.NoError(t, err)
	assert.Equal(t, 2048, c.MemMiB)
	assert.Equal(t, 3, c.Reps)
	assert.Equal(t, "bench-results/bench.json", c.Out)
	assert.Equal(t, copierWrite, c.Copier)

	c, err = parseFlags([]string{"-smoke"}, &bytes.Buffer{})
	require.NoError(t, err)
	assert.Equal(t, 512, c.MemMiB)
	assert.Equal(t, 1, c.Reps)

	c, err = parseFlags([]string{"-smoke", "-reps", "2"}, &bytes.Buffer{})
	require.NoError(t, err)
	assert.Equal(t, 2, c.Reps, "an explicit flag wins over -smoke's default")

	c, err = parseFlags([]string{"-sweep"}, &bytes.Buffer{})
	require.NoError(t, err)
	assert.Equal(t, "bench-results/sweep.json", c.Out)

	c, err = parseFlags([]string{"-live"}, &bytes.Buffer{})
	require.NoError(t, err)
	assert.Equal(t, "bench-results/live.json", c.Out)
	assert.Equal(t, 1, c.Reps)

	for _, bad := range [][]string{
		{"-smoke", "-sweep"}, {"-live", "-sweep"}, {"-mem", "100"}, {"-reps", "0"}, {"-churn", "1.5"},
		{"-keep", "0.4", "-text", "0.4"}, {"-interval", "0"}, {"extra"}, {"-nosuchflag"}, {"-copier", "cat"}, {"-machine", "virt"},
	} {
		_, err := parseFlags(bad, &bytes.Buffer{})
		assert.Error(t, err, "%q", bad)
	}
}

func TestSaveOrderAlternates(t *testing.T) {
	for _, mapped := range []bool{false, true} {
		for rep := range 4 {
			s, r := saveOrder(rep, mapped), restoreOrder(rep, mapped)
			if mapped {
				assert.ElementsMatch(t, tools, s)
				assert.ElementsMatch(t, []string{toolQEMU, toolMappedRAM, toolKvmckpt}, r)
			} else {
				assert.ElementsMatch(t, []string{toolQEMU, toolNaive, toolKvmckpt}, s)
				assert.ElementsMatch(t, []string{toolQEMU, toolKvmckpt}, r)
			}
			if prev := rep - 1; prev >= 0 {
				assert.NotEqual(t, saveOrder(prev, mapped)[0], s[0], "rep %d starts with the same tool as the one before", rep)
				assert.NotEqual(t, restoreOrder(prev, mapped)[0], r[0])
			}
		}
	}
}
