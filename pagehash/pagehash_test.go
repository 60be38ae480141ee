package pagehash

import (
	"bytes"
	"math/rand/v2"
	"testing"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

func page(b byte) []byte { return bytes.Repeat([]byte{b}, 4096) }

// TestChanged: a page differs from its base when its hash differs, and a
// page the base does not hold is compared with the fill page.
func TestChanged(t *testing.T) {
	const n = 300
	rng := rand.New(rand.NewPCG(1, 2))
	content := func(gen, p int) byte { return byte(gen*7 + p) }
	basePages, curPages := pagemap.NewBitmap(n), pagemap.NewBitmap(n)
	for p := range n {
		if rng.IntN(3) > 0 {
			basePages.Set(uint64(p))
		}
		if rng.IntN(3) > 0 {
			curPages.Set(uint64(p))
		}
	}
	base, cur := New(basePages), New(curPages)
	fill := Filled(4096, 0)
	want := pagemap.NewBitmap(n)
	k := 0
	for p := range basePages.All() {
		base.Sums[k] = Of(page(content(0, int(p))))
		k++
	}
	k = 0
	for p := range curPages.All() {
		switch {
		case p%5 == 0: // unchanged, if the base has it
			cur.Sums[k] = Of(page(content(0, int(p))))
			if !basePages.Test(p) {
				want.Set(p)
			}
		case p%7 == 0: // the fill page: unchanged where the base has none
			cur.Sums[k] = fill
			if basePages.Test(p) {
				want.Set(p)
			}
		default:
			cur.Sums[k] = Of(page(content(1, int(p))))
			want.Set(p)
		}
		k++
	}
	got, err := Changed(cur, base, fill)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Equal(want) {
		t.Errorf("changed %d pages, want %d", got.Count(), want.Count())
	}
	if _, err := Changed(cur, New(pagemap.NewBitmap(n+1)), fill); err == nil {
		t.Error("tables of different lengths compared")
	}
}

func TestIndex(t *testing.T) {
	pages := pagemap.NewBitmap(1000)
	for _, p := range []uint64{3, 64, 65, 500, 999} {
		pages.Set(p)
	}
	tb := New(pages)
	for i := range tb.Sums {
		tb.Sums[i][0] = byte(i + 1)
	}
	x := tb.Index()
	for _, q := range []struct {
		p    uint64
		want byte
		ok   bool
	}{{3, 1, true}, {10, 0, false}, {64, 2, true}, {65, 3, true}, {400, 0, false}, {500, 4, true}, {999, 5, true}, {1000, 0, false}} {
		s, ok := x.Get(q.p)
		if ok != q.ok || s[0] != q.want {
			t.Errorf("Get(%d) = %d, %v; want %d, %v", q.p, s[0], ok, q.want, q.ok)
		}
	}
}

func TestOf(t *testing.T) {
	if Of(page(1)) == Of(page(2)) || Of(page(0)) != Filled(4096, 0) {
		t.Error("hashes of pages")
	}
}

// FuzzDecodeSums: a table from untrusted bytes has one hash per page or
// is refused.
func FuzzDecodeSums(f *testing.F) {
	f.Add(uint64(0b1011), []byte(make([]byte, 48)))
	f.Add(uint64(1), []byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, bits uint64, data []byte) {
		pages := pagemap.NewBitmap(64)
		for i := range uint64(64) {
			if bits&(1<<i) != 0 {
				pages.Set(i)
			}
		}
		tb, err := DecodeSums(pages, data)
		if err != nil {
			return
		}
		if err := tb.Check(); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(tb.AppendSums(nil), data) {
			t.Fatal("round trip")
		}
	})
}

// BenchmarkOf hashes pages one by one: what a save with a parent does to
// every page in use, in the pause.
func BenchmarkOf(b *testing.B) {
	p := make([]byte, 1<<20)
	for i := range p {
		p[i] = byte(i * 7)
	}
	b.SetBytes(int64(len(p)))
	for b.Loop() {
		for off := 0; off < len(p); off += 4096 {
			_ = Of(p[off : off+4096])
		}
	}
}

// BenchmarkChanged compares the hashes of 256 Ki pages (1 GiB) with a
// base's, bytes counted as the pages they stand for.
func BenchmarkChanged(b *testing.B) {
	const n = 1 << 18
	pages := pagemap.NewBitmap(n)
	pages.SetRange(0, n)
	cur, base := New(pages), New(pages)
	for i := range cur.Sums {
		cur.Sums[i][0] = byte(i)
		base.Sums[i][0] = byte(i % 10)
	}
	b.SetBytes(n * 4096)
	for b.Loop() {
		if _, err := Changed(cur, base, Sum{}); err != nil {
			b.Fatal(err)
		}
	}
}
