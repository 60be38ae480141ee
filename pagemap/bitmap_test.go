package pagemap

import (
	"encoding/binary"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// model is the obvious bitmap, one bool per page, that Bitmap must agree
// with.
type model []bool

func (m model) runs(want bool) [][2]uint64 {
	var out [][2]uint64
	for i := 0; i < len(m); {
		if m[i] != want {
			i++
			continue
		}
		j := i
		for j < len(m) && m[j] == want {
			j++
		}
		out = append(out, [2]uint64{uint64(i), uint64(j - i)})
		i = j
	}
	return out
}

func collect(seq func(yield func(uint64, uint64) bool)) [][2]uint64 {
	var out [][2]uint64
	for s, c := range seq {
		out = append(out, [2]uint64{s, c})
	}
	return out
}

func checkModel(tb testing.TB, b *Bitmap, m model) {
	tb.Helper()
	require.Equal(tb, uint64(len(m)), b.Len())
	var count uint64
	var set []uint64
	for i, v := range m {
		require.Equal(tb, v, b.Test(uint64(i)), "page %d", i)
		if v {
			count++
			set = append(set, uint64(i))
		}
	}
	require.Equal(tb, count, b.Count())
	require.Equal(tb, m.runs(true), collect(b.Runs()))
	require.Equal(tb, m.runs(false), collect(b.ClearRuns()))
	require.Equal(tb, set, slices.Collect(b.All()))
	for i := 0; i <= len(m)+1; i++ {
		wantSet, wantClear := uint64(len(m)), uint64(len(m))
		for j := i; j < len(m); j++ {
			if m[j] {
				wantSet = uint64(j)
				break
			}
		}
		for j := i; j < len(m); j++ {
			if !m[j] {
				wantClear = uint64(j)
				break
			}
		}
		got, ok := b.NextSet(uint64(i))
		require.Equal(tb, wantSet, got, "NextSet(%d)", i)
		require.Equal(tb, wantSet < uint64(len(m)), ok)
		got, ok = b.NextClear(uint64(i))
		require.Equal(tb, wantClear, got, "NextClear(%d)", i)
		require.Equal(tb, wantClear < uint64(len(m)), ok)
		for _, n := range []int{0, 1, 2, 63, 64, 65, 130} {
			if i+n > len(m) {
				break
			}
			require.Equal(tb, slices.Contains(m[i:i+n], true), b.AnyInRange(uint64(i), uint64(n)), "AnyInRange(%d, %d)", i, n)
		}
	}
}

func TestBitmapRanges(t *testing.T) {
	tests := []struct {
		name         string
		n            uint64
		set, cleared [][2]uint64 // (start, count), applied in order
	}{
		{name: "empty", n: 0},
		{name: "one page", n: 1, set: [][2]uint64{{0, 1}}},
		{name: "zero count", n: 10, set: [][2]uint64{{3, 0}, {10, 0}}},
		{name: "within word", n: 64, set: [][2]uint64{{3, 5}}},
		{name: "whole word", n: 64, set: [][2]uint64{{0, 64}}},
		{name: "across words", n: 200, set: [][2]uint64{{60, 10}}},
		{name: "many words", n: 1000, set: [][2]uint64{{1, 998}}, cleared: [][2]uint64{{64, 64}, {500, 1}}},
		{name: "ragged end", n: 130, set: [][2]uint64{{0, 130}}, cleared: [][2]uint64{{129, 1}}},
		{name: "last bit", n: 193, set: [][2]uint64{{192, 1}}},
		{name: "all then none", n: 300, set: [][2]uint64{{0, 300}}, cleared: [][2]uint64{{0, 300}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, m := NewBitmap(tt.n), make(model, tt.n)
			for _, r := range tt.set {
				b.SetRange(r[0], r[1])
				for i := r[0]; i < r[0]+r[1]; i++ {
					m[i] = true
				}
			}
			for _, r := range tt.cleared {
				b.ClearRange(r[0], r[1])
				for i := r[0]; i < r[0]+r[1]; i++ {
					m[i] = false
				}
			}
			checkModel(t, b, m)
		})
	}
}

func TestBitmapRandomOps(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, n := range []uint64{1, 63, 64, 65, 127, 128, 129, 700} {
		b, m := NewBitmap(n), make(model, n)
		for range 200 {
			i := rng.Uint64N(n)
			switch rng.IntN(4) {
			case 0:
				b.Set(i)
				m[i] = true
			case 1:
				b.Clear(i)
				m[i] = false
			case 2, 3:
				c := rng.Uint64N(n - i + 1)
				set := rng.IntN(2) == 0
				if set {
					b.SetRange(i, c)
				} else {
					b.ClearRange(i, c)
				}
				for j := i; j < i+c; j++ {
					m[j] = set
				}
			}
		}
		checkModel(t, b, m)
	}
}

func TestBitmapSetOps(t *testing.T) {
	a, b := NewBitmap(200), NewBitmap(200)
	a.SetRange(0, 100)
	b.SetRange(50, 100)

	and := a.Clone()
	and.And(b)
	assert.Equal(t, [][2]uint64{{50, 50}}, collect(and.Runs()))

	andNot := a.Clone()
	andNot.AndNot(b)
	assert.Equal(t, [][2]uint64{{0, 50}}, collect(andNot.Runs()))

	or := a.Clone()
	or.Or(b)
	assert.Equal(t, [][2]uint64{{0, 150}}, collect(or.Runs()))

	assert.Equal(t, [][2]uint64{{0, 100}}, collect(a.Runs()), "Clone must not share words")
	assert.True(t, a.Equal(a.Clone()))
	assert.False(t, a.Equal(b))
	assert.False(t, a.Equal(NewBitmap(201)))
}

func TestBitmapMisusePanics(t *testing.T) {
	b := NewBitmap(100)
	tests := map[string]func(){
		"Set":               func() { b.Set(100) },
		"Clear":             func() { b.Clear(1 << 40) },
		"Test":              func() { b.Test(100) },
		"SetRange past end": func() { b.SetRange(90, 11) },
		"SetRange overflow": func() { b.SetRange(1, ^uint64(0)) },
		"ClearRange":        func() { b.ClearRange(101, 0) },
		"AnyInRange":        func() { b.AnyInRange(99, 2) },
		"And":               func() { b.And(NewBitmap(99)) },
		"AndNot":            func() { b.AndNot(NewBitmap(101)) },
		"Or":                func() { b.Or(NewBitmap(0)) },
	}
	for name, f := range tests {
		t.Run(name, func(t *testing.T) { assert.Panics(t, f) })
	}
}

func TestBitmapIterStop(t *testing.T) {
	b := NewBitmap(300)
	b.SetRange(0, 10)
	b.SetRange(100, 10)
	b.SetRange(200, 10)
	for range b.Runs() {
		break
	}
	for range b.ClearRuns() {
		break
	}
	for range b.All() {
		break
	}
}

func TestBitmapBinaryRoundTrip(t *testing.T) {
	for _, n := range []uint64{0, 1, 63, 64, 65, 1000} {
		b := NewBitmap(n)
		for i := uint64(0); i < n; i += 3 {
			b.Set(i)
		}
		data, err := b.MarshalBinary()
		require.NoError(t, err)
		want, ok := EncodedLen(n)
		require.True(t, ok)
		require.Equal(t, want, uint64(len(data)))

		var got Bitmap
		require.NoError(t, got.UnmarshalBinary(data))
		require.True(t, b.Equal(&got), "n=%d", n)
	}
}

func TestBitmapUnmarshalErrors(t *testing.T) {
	enc := func(n uint64, words ...uint64) []byte {
		out := binary.LittleEndian.AppendUint64(nil, n)
		for _, w := range words {
			out = binary.LittleEndian.AppendUint64(out, w)
		}
		return out
	}
	tests := []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"short header", []byte{1, 0, 0}},
		{"missing word", enc(65, 0)},
		{"extra word", enc(64, 0, 0)},
		{"odd length", append(enc(64, 0), 0)},
		{"huge count", enc(^uint64(0))},
		{"count needs more than data", enc(1<<62, 0)},
		{"bit past end", enc(3, 1<<3)},
		{"high bit past end", enc(65, 0, 1<<63)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := NewBitmap(5)
			b.Set(4)
			err := b.UnmarshalBinary(tt.data)
			require.ErrorIs(t, err, ErrBitmapEncoding)
			assert.Equal(t, uint64(5), b.Len(), "failed decode must leave b alone")
			assert.True(t, b.Test(4))
		})
	}
}

func FuzzBitmapUnmarshal(f *testing.F) {
	for _, n := range []uint64{0, 1, 64, 130} {
		b := NewBitmap(n)
		if n > 0 {
			b.SetRange(0, n/2+1)
		}
		data, _ := b.MarshalBinary()
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var b Bitmap
		if err := b.UnmarshalBinary(data); err != nil {
			return
		}
		var pages uint64
		for _, c := range b.Runs() {
			pages += c
		}
		require.Equal(t, b.Count(), pages)
		again, err := b.MarshalBinary()
		require.NoError(t, err)
		require.Equal(t, data, again, "encoding must be canonical")
	})
}

// benchBitmap is a bitmap over 16 GiB of 4 KiB pages with runs of set and
// clear pages of random lengths, roughly the shape of a used-page bitmap.
func benchBitmap(tb testing.TB) *Bitmap {
	tb.Helper()
	rng := rand.New(rand.NewPCG(3, 4))
	b := NewBitmap(16 << 30 >> 12)
	for i := uint64(0); i < b.Len(); {
		n := min(1+rng.Uint64N(512), b.Len()-i)
		if rng.IntN(2) == 0 {
			b.SetRange(i, n)
		}
		i += n
	}
	return b
}

func BenchmarkBitmapRuns(b *testing.B) {
	bm := benchBitmap(b)
	want := bm.Count()
	b.SetBytes(int64(len(bm.words) * 8))
	for b.Loop() {
		var pages uint64
		for _, c := range bm.Runs() {
			pages += c
		}
		if pages != want {
			b.Fatal("runs disagree with count")
		}
	}
}

func BenchmarkBitmapCount(b *testing.B) {
	bm := benchBitmap(b)
	b.SetBytes(int64(len(bm.words) * 8))
	for b.Loop() {
		bm.Count()
	}
}

func BenchmarkBitmapSetRange(b *testing.B) {
	bm := NewBitmap(16 << 30 >> 12)
	b.SetBytes(int64(len(bm.words) * 8))
	for b.Loop() {
		bm.SetRange(1, bm.Len()-2)
		bm.ClearRange(1, bm.Len()-2)
	}
}

func TestRankSubset(t *testing.T) {
	b := NewBitmap(200)
	for _, i := range []uint64{0, 5, 63, 64, 130, 199} {
		b.Set(i)
	}
	for i, want := range map[uint64]uint64{0: 0, 1: 1, 6: 2, 64: 3, 65: 4, 131: 5, 199: 5, 200: 6} {
		if got := b.Rank(i); got != want {
			t.Errorf("Rank(%d) = %d, want %d", i, got, want)
		}
	}
	ri := b.RankIndex()
	for i := uint64(0); i <= 200; i++ {
		if ri.Rank(i) != b.Rank(i) {
			t.Errorf("RankIndex.Rank(%d) = %d, Rank %d", i, ri.Rank(i), b.Rank(i))
		}
	}
	o := b.Clone()
	if !b.SubsetOf(o) {
		t.Error("a bitmap is not a subset of itself")
	}
	o.Clear(130)
	if b.SubsetOf(o) || !o.SubsetOf(b) {
		t.Error("subset wrong after a clear")
	}
}
