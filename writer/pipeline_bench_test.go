package writer

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/pierrec/lz4/v4"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

// pipelineRAM is the guest of BenchmarkPipeline: 2 GiB, as the default
// bench guest, of which a quarter is in use.
const pipelineRAM = 2 << 30

// pipelineDir is where BenchmarkPipeline writes: a disk, as a checkpoint
// goes to one (the default is on this host's root file system).
func pipelineDir() string {
	if d := os.Getenv("KVMCKPT_BENCH_DIR"); d != "" {
		return d
	}
	return "/var/tmp"
}

// pipelineGuest makes the RAM of BenchmarkPipeline: a memfd (a shared
// memory file, as a RAM file in /dev/shm) shaped as the default bench
// guest's pages in use: 40% random (kept data, compressed files), 40%
// text, 20% sparse (page tables, slab), in runs of 1 to 512 pages spread
// over the whole RAM, as a guest's buddy allocator leaves them.
func pipelineGuest(b *testing.B) (fd int, used *pagemap.Bitmap) {
	b.Helper()
	fd, err := unix.MemfdCreate("pipeline-ram", unix.MFD_CLOEXEC)
	require.NoError(b, err)
	b.Cleanup(func() { unix.Close(fd) })
	require.NoError(b, unix.Ftruncate(fd, pipelineRAM))
	ram, err := unix.Mmap(fd, 0, pipelineRAM, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	require.NoError(b, err)
	defer unix.Munmap(ram)

	pages := uint64(pipelineRAM / PageSize)
	used = pagemap.NewBitmap(pages)
	src := rand.NewChaCha8([32]byte{17})
	rng := rand.New(src)
	for used.Count() < pages/4 {
		start := rng.Uint64N(pages - 512)
		used.SetRange(start, 1+rng.Uint64N(512))
	}
	k := 0
	for start, count := range used.Runs() {
		// A run of pages holds one kind of data, as a buffer the guest
		// filled does.
		k++
		for p := start; p < start+count; p++ {
			page := ram[p*PageSize : (p+1)*PageSize]
			switch k % 5 {
			case 0, 1:
				src.Read(page)
			case 2, 3:
				fillPages(page, compressible, p)
			case 4:
				for range 32 {
					page[rng.IntN(PageSize/8)*8] = byte(rng.Uint32())
				}
			}
		}
	}
	return fd, used
}

// mapRAM maps the guest's RAM afresh, read-only, as a save maps a RAM
// file: its pages are mapped in by the first read.
func mapRAM(b *testing.B, fd int) []byte {
	ram, err := unix.Mmap(fd, 0, pipelineRAM, unix.PROT_READ, unix.MAP_SHARED)
	require.NoError(b, err)
	return ram
}

// memoryLimit measures how fast workers goroutines read the pages of used
// out of a fresh mapping of the RAM (copying them, as the fastest reader
// of memory does): the memory side of the pipeline's limit, bytes/s.
func memoryLimit(b *testing.B, fd int, used *pagemap.Bitmap, workers int) float64 {
	ram := mapRAM(b, fd)
	defer unix.Munmap(ram)
	type run struct{ start, count uint64 }
	runs := make(chan run, 64)
	var wg sync.WaitGroup
	t := time.Now()
	for range workers {
		wg.Go(func() {
			buf := make([]byte, 1<<20)
			for r := range runs {
				mem := ram[r.start*PageSize : (r.start+r.count)*PageSize]
				for len(mem) > 0 {
					mem = mem[copy(buf, mem):]
				}
			}
		})
	}
	for start, count := range used.Runs() {
		runs <- run{start, count}
	}
	close(runs)
	wg.Wait()
	return float64(used.Count()*PageSize) / time.Since(t).Seconds()
}

// diskLimit measures how long the disk under dir takes to write n bytes
// sequentially with O_DIRECT in 4 MiB blocks and make them durable: the
// disk side of the pipeline's limit.
func diskLimit(b *testing.B, dir string, n int64) time.Duration {
	f, err := os.CreateTemp(dir, "kvmckpt-disk-*")
	require.NoError(b, err)
	defer os.Remove(f.Name())
	defer f.Close()
	direct := setDirect(f, true) == nil
	raw := make([]byte, directBlock+directAlign)
	skip := int(-uintptr(unsafe.Pointer(&raw[0])) & (directAlign - 1))
	block := raw[skip : skip+directBlock]
	rand.NewChaCha8([32]byte{}).Read(block)
	t := time.Now()
	for off := int64(0); off < n; off += directBlock {
		_, err := f.WriteAt(block, off)
		require.NoError(b, err)
	}
	require.NoError(b, unix.Fdatasync(int(f.Fd())))
	if !direct {
		b.Logf("%s takes no O_DIRECT: its limit is the page cache's", dir)
	}
	return time.Since(t)
}

// BenchmarkPipeline measures the pages phase of a stop-and-copy save as
// a save runs it: a fresh mapping of a 2 GiB shared-memory RAM file with
// 512 MiB in use, gathered, compressed as each compression asks and
// written to a file on disk (KVMCKPT_BENCH_DIR, default /var/tmp), made
// durable. Beside it, it measures the two physical limits of that work
// on this host: the disk's O_DIRECT bandwidth for the bytes the
// checkpoint took, and the memory bandwidth of reading the pages in use
// out of a fresh mapping. It reports both and the pipeline's raw page
// bytes per second as a fraction of the lower one ("of-limit").
func BenchmarkPipeline(b *testing.B) {
	fd, used := pipelineGuest(b)
	dir := pipelineDir()
	h := testHeader(pipelineRAM / PageSize)
	raw := int64(used.Count() * PageSize)
	for _, comp := range []Compression{CompressionLZ4, CompressionAuto, CompressionNone} {
		b.Run(string(comp), func(b *testing.B) {
			path := filepath.Join(dir, fmt.Sprintf("kvmckpt-pipeline-%d", os.Getpid()))
			defer os.Remove(path)
			opts := Options{Compression: comp, PageHashes: true}
			var stats Stats
			var pages, disk time.Duration
			b.SetBytes(raw)
			for b.Loop() {
				ram := mapRAM(b, fd)
				w, err := Create(path, h, opts)
				require.NoError(b, err)
				t := time.Now()
				require.NoError(b, w.WritePages([][]byte{ram}, used, nil))
				pages += time.Since(t)
				_, err = w.WriteDeviceState(strings.NewReader("device state"))
				require.NoError(b, err)
				require.NoError(b, w.Commit())
				stats = w.Stats()
				unix.Munmap(ram)
				// The disk's limit, right after: this host's disk
				// speed drifts by 2x within minutes.
				b.StopTimer()
				disk += diskLimit(b, dir, stats.StoredBytes)
				b.StartTimer()
			}
			b.StopTimer()
			rate := float64(raw) * float64(b.N) / pages.Seconds()
			diskRate := float64(stats.StoredBytes) * float64(b.N) / disk.Seconds()
			mem := memoryLimit(b, fd, used, runtime.GOMAXPROCS(0))
			limit := min(diskRate, mem)
			b.ReportMetric(float64(stats.StoredBytes)/float64(raw), "stored/raw")
			b.ReportMetric(rate/1e6, "pages-MB/s")
			b.ReportMetric(diskRate/1e6, "disk-MB/s")
			b.ReportMetric(mem/1e6, "mem-MB/s")
			b.ReportMetric(rate/limit, "of-limit")
			sg := stats.Stages
			b.Logf("last run: read %v, hash %v, lz4 %v, crc %v, idle %v (workers' sums); wait for chunks %v, for the disk %v; disk busy %v; %d of %d chunks raw by choice",
				sg.Read, sg.Hash, sg.Compress, sg.Checksum, sg.Idle, sg.WaitChunk, sg.WaitDisk, sg.Disk, sg.RawChunks, stats.ChunksRaw+stats.ChunksLZ4)
		})
	}
}

// BenchmarkDiskBesideWorkers measures the disk as the pages pipeline's
// I/O sees it: 512 MiB written through a fileWriter (4 MiB O_DIRECT
// blocks) to KVMCKPT_BENCH_DIR and made durable, alone and while one
// goroutine per CPU compresses text with LZ4 as the workers do. Beside
// the workers it runs with GOMAXPROCS at the workers' count ("procs=W",
// the pipeline before spareP) and with one P more ("procs=W+1", what
// spareP gives), with one write at a time ("depth=1") and with the
// fileWriter's two and its space reserved ahead ("depth=2"; without the
// reservation ext4 serializes the extending writes: "unreserved"). Run
// them together: this host's disk drifts from minute to minute.
func BenchmarkDiskBesideWorkers(b *testing.B) {
	const n = 512 << 20
	src := make([]byte, 4<<20)
	rand.NewChaCha8([32]byte{5}).Read(src)
	text := make([]byte, DefaultChunkPages*PageSize)
	fillPages(text, compressible, 1)
	workers := runtime.GOMAXPROCS(0)
	for _, c := range []struct {
		name         string
		busy         bool
		procs, depth int
		reserve      bool
	}{
		{"alone/depth=1", false, workers, 1, false},
		{"alone/depth=2", false, workers, 2, true},
		{"workers/procs=W/depth=1", true, workers, 1, false},
		{"workers/procs=W+1/depth=1", true, workers + 1, 1, false},
		{"workers/procs=W/depth=2", true, workers, 2, true},
		{"workers/procs=W+1/depth=2", true, workers + 1, 2, true},
		{"workers/procs=W+1/depth=2/unreserved", true, workers + 1, 2, false},
	} {
		b.Run(c.name, func(b *testing.B) {
			defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(c.procs))
			var stop atomic.Bool
			var wg sync.WaitGroup
			for range workers {
				if !c.busy {
					break
				}
				wg.Go(func() {
					var z lz4.Compressor
					dst := make([]byte, lz4.CompressBlockBound(len(text)))
					for !stop.Load() {
						_, _ = z.CompressBlock(text, dst)
					}
				})
			}
			b.SetBytes(n)
			for b.Loop() {
				f, err := os.CreateTemp(pipelineDir(), "kvmckpt-disk-*")
				require.NoError(b, err)
				fw := newFileWriterDepth(f, c.depth, c.reserve)
				for off := 0; off < n; off += len(src) {
					_, err = fw.Write(src)
					require.NoError(b, err)
				}
				require.NoError(b, fw.Flush())
				require.NoError(b, unix.Fdatasync(int(f.Fd())))
				b.StopTimer()
				f.Close()
				os.Remove(f.Name())
				b.StartTimer()
			}
			b.StopTimer()
			stop.Store(true)
			wg.Wait()
		})
	}
}
