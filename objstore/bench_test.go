package objstore

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/kvmckpt/kvmckpt/internal/s3test"
)

// BenchmarkUpload and BenchmarkRead move 256 MiB of incompressible bytes
// through a local SeaweedFS: the store's side of a save and a restore,
// without a guest.
func BenchmarkUpload(b *testing.B) {
	s3test.StartT(b, "bench")
	data := randBytes(256<<20, 1)
	for _, par := range []int{4, 8, 16} {
		b.Run(fmt.Sprintf("parallel=%d", par), func(b *testing.B) {
			s := New(Config{Parallel: par})
			b.SetBytes(int64(len(data)))
			for b.Loop() {
				u, err := s.Create(context.Background(), "s3://bench/obj", int64(len(data)))
				if err != nil {
					b.Fatal(err)
				}
				for off := 0; off < len(data); off += 1 << 20 {
					if _, err := u.Write(data[off : off+1<<20]); err != nil {
						b.Fatal(err)
					}
				}
				if err := u.Commit(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkRead(b *testing.B) {
	s3test.StartT(b, "bench")
	data := randBytes(256<<20, 1)
	s := New(Config{})
	u, err := s.Create(context.Background(), "s3://bench/obj", int64(len(data)))
	if err != nil {
		b.Fatal(err)
	}
	if _, err := u.Write(data); err != nil {
		b.Fatal(err)
	}
	if err := u.Commit(); err != nil {
		b.Fatal(err)
	}
	// As a restore reads: two workers taking chunks of about 768 KiB in
	// turn.
	const chunk = 768 << 10
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		o, err := s.Open(context.Background(), "s3://bench/obj")
		if err != nil {
			b.Fatal(err)
		}
		var next atomic.Int64
		var wg sync.WaitGroup
		for range 2 {
			wg.Go(func() {
				buf := make([]byte, chunk)
				for {
					off := next.Add(chunk) - chunk
					if off >= o.Size() {
						return
					}
					if _, err := o.ReadAt(buf[:min(chunk, o.Size()-off)], off); err != nil {
						b.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
		o.Close()
	}
}
