package writer

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestCRCCombinePages(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{1, 2, 3, 64} {
		data := make([]byte, n*PageSize)
		for i := range data {
			data[i] = byte(rng.Uint32())
		}
		crcs := make([]uint32, n)
		for i := range crcs {
			crcs[i] = crc(data[i*PageSize : (i+1)*PageSize])
		}
		assert.Equal(t, crc(data), crcCombinePages(crcs), "%d pages", n)
	}
	assert.Equal(t, crc(nil), crcCombinePages(nil))
	for _, c := range []uint32{0, 1, 0xdeadbeef, 0xffffffff} {
		assert.Equal(t, gfMul(c, pageShift), mulPageShift(c))
	}
}

func BenchmarkPatchCRC(b *testing.B) {
	crcs := make([]uint32, 64)
	page := make([]byte, PageSize)
	b.SetBytes(PageSize)
	for b.Loop() {
		crcs[7] = crc(page)
		_ = crcCombinePages(crcs)
	}
}
