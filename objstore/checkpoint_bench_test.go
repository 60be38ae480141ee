package objstore

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kvmckpt/kvmckpt/internal/s3test"
	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/writer"
)

// BenchmarkCheckpoint writes and restores a 256 MiB checkpoint (pages of
// random bytes and of text, half each) to and from a local file and the
// local store, in one run: the pipeline of a save and a restore without a
// guest. MB/s are of the pages' raw bytes.
func BenchmarkCheckpoint(b *testing.B) {
	s3test.StartT(b, "bench")
	Register(Config{})
	const pages = 65536
	h := writer.Header{Regions: []writer.Region{{ID: "pc.ram", Size: pages * writer.PageSize, Mappings: []writer.Mapping{{Size: pages * writer.PageSize}}}}}
	ram := randBytes(pages*writer.PageSize, 3)
	for p := 0; p < pages; p += 2 {
		page := ram[p*writer.PageSize : (p+1)*writer.PageSize]
		for i := range page {
			page[i] = "the quick brown fox jumps over the lazy dog "[i%44] ^ byte(p)
		}
	}
	used := pagemap.NewBitmap(pages)
	used.SetRange(0, pages)
	names := map[string]string{"file": filepath.Join(b.TempDir(), "c.kvmckpt"), "s3": "s3://bench/c.kvmckpt"}
	for _, target := range []string{"file", "s3"} {
		name := names[target]
		b.Run("save/"+target, func(b *testing.B) {
			b.SetBytes(int64(len(ram)))
			for b.Loop() {
				w, err := writer.Create(name, h, writer.Options{})
				if err != nil {
					b.Fatal(err)
				}
				if err := w.WritePages([][]byte{ram}, used, nil); err != nil {
					b.Fatal(err)
				}
				if _, err := w.WriteDeviceState(strings.NewReader("device state")); err != nil {
					b.Fatal(err)
				}
				if err := w.Commit(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	dst, err := os.CreateTemp(b.TempDir(), "ram")
	if err != nil {
		b.Fatal(err)
	}
	defer dst.Close()
	for _, target := range []string{"file", "s3"} {
		name := names[target]
		b.Run("restore/"+target, func(b *testing.B) {
			b.SetBytes(int64(len(ram)))
			for b.Loop() {
				c, err := writer.OpenChain(name, writer.ChainOptions{})
				if err != nil {
					b.Fatal(err)
				}
				if err := c.RestorePagesTo(dst, writer.RestoreOptions{}); err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
		})
	}
}
