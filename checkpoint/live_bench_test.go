package checkpoint

import (
	"context"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/introspect"
	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/qmp"
	"github.com/kvmckpt/kvmckpt/writer"
)

// BenchmarkFinalRound measures a live save's final round, the work of its
// pause: a 2 GiB guest (RAM in a shared memory file, as QEMU's) with 512
// MiB used, of which hot pages changed since their copy (none: an idle
// guest; a 128 MiB working set rewritten: what prediction defers to the
// pause). Bytes are the used RAM the round reads; the checkpoint file is
// in $TMPDIR's file system, fsynced each time, as the pause does; the
// case without write-behind is the pause before it.
func BenchmarkFinalRound(b *testing.B) {
	for _, c := range []struct {
		name        string
		hotMiB      int
		writeBehind bool
	}{{"idle", 0, true}, {"hot128MiB", 128, true}, {"hot128MiB-no-write-behind", 128, false}} {
		b.Run(c.name, func(b *testing.B) {
			const ramSize, usedMiB = 2 << 30, 512
			total := uint64(ramSize / introspect.PageSize)
			f, err := os.CreateTemp("/dev/shm", "kvmckpt-bench-ram")
			require.NoError(b, err)
			os.Remove(f.Name())
			defer f.Close()
			require.NoError(b, f.Truncate(ramSize))
			ram, err := syscall.Mmap(int(f.Fd()), 0, ramSize, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
			require.NoError(b, err)
			defer syscall.Munmap(ram)
			// As a guest some time after boot: every fourth 64-page group
			// free (written once, then freed), the others used up to
			// usedMiB, all incompressible; the rest of RAM free and never
			// touched (holes).
			rng := rand.New(rand.NewPCG(1, 2))
			free := pagemap.NewBitmap(total)
			used, p := uint64(0), uint64(0)
			for ; p < total && used < usedMiB<<20/introspect.PageSize; p++ {
				if (p/liveGroupPages)%4 == 3 {
					free.Set(p)
				} else {
					used++
				}
				for o := p * introspect.PageSize; o < (p+1)*introspect.PageSize; o += 8 {
					binary.LittleEndian.PutUint64(ram[o:], rng.Uint64())
				}
			}
			free.SetRange(p, total-p)
			g := &guest{backends: []qmp.Backend{{ID: "pc.ram", Size: ramSize}}, files: []*os.File{f}, ram: [][]byte{ram}, log: logger(nil)}
			out := filepath.Join(b.TempDir(), "bench.kvmckpt")
			h := writer.Header{Regions: []writer.Region{{ID: "pc.ram", Size: ramSize}}}
			w, err := writer.CreateLive(out, h, writer.Options{ChunkPages: liveGroupPages})
			require.NoError(b, err)
			defer w.Abort()
			ls := newLiveSave(g, w, nil, nil, true)
			ctx := context.Background()
			hot := uint64(c.hotMiB << 20 / introspect.PageSize)
			touch := func(gen uint64) {
				for p := uint64(0); p < hot; p++ {
					if !free.Test(p) {
						binary.LittleEndian.PutUint64(ram[p*introspect.PageSize:], gen)
					}
				}
			}
			_, err = ls.round(ctx, free, roundSurvey)
			require.NoError(b, err)
			// Changed since the survey: prediction defers the working
			// set, which the final round then writes.
			touch(1)
			st, err := ls.round(ctx, free, roundCopy)
			require.NoError(b, err)
			require.Equal(b, hot > 0, st.deferredPages > 0)
			require.NoError(b, w.Sync())
			if c.writeBehind {
				w.WriteBehind() // as finishLive
			}
			b.SetBytes(int64(used * introspect.PageSize))
			var roundT, syncT time.Duration
			b.ResetTimer()
			for i := range b.N {
				b.StopTimer()
				// The working set changes: one word of each hot page.
				touch(uint64(i) + 2)
				runtime.GC()
				b.StartTimer()
				t0 := time.Now()
				st, err := ls.round(ctx, free, roundFinal)
				require.NoError(b, err)
				t1 := time.Now()
				require.NoError(b, w.Sync())
				roundT += t1.Sub(t0)
				syncT += time.Since(t1)
				if hot > 0 && st.pages == 0 {
					b.Fatal("the final round wrote nothing")
				}
			}
			b.ReportMetric(float64(roundT.Milliseconds())/float64(b.N), "round-ms/op")
			b.ReportMetric(float64(syncT.Milliseconds())/float64(b.N), "sync-ms/op")
		})
	}
}
