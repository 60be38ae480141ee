// Package pagehash names page contents by their hash: the 128-bit XXH3 of
// a page's bytes, kept for every page of a checkpoint so that the next
// checkpoint of the same guest can tell which pages changed without
// reading the previous one.
//
// XXH3 (https://github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md) is
// not a cryptographic hash: anyone who knows a page's old content can
// make a new one with the same hash. A guest that does so only makes its
// own checkpoint keep its old page; nothing of another guest or another
// checkpoint can be reached that way. Between contents no one chose, a
// collision of 128 bits does not happen in practice.
package pagehash

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/zeebo/xxh3"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

// Name is the hash's name in a checkpoint's header.
const Name = "xxh3-128"

// Size is the length of a [Sum].
const Size = 16

// Sum is a page's hash: XXH3-128, its low 64 bits first, each half little
// endian.
type Sum [Size]byte

// Of returns the hash of page.
func Of(page []byte) Sum {
	h := xxh3.Hash128(page)
	var s Sum
	binary.LittleEndian.PutUint64(s[:8], h.Lo)
	binary.LittleEndian.PutUint64(s[8:], h.Hi)
	return s
}

// Filled returns the hash of a page of n bytes that all hold fill.
func Filled(n int, fill byte) Sum {
	p := make([]byte, n)
	for i := range p {
		p[i] = fill
	}
	return Of(p)
}

// ErrTable is wrapped by the errors of [Table.UnmarshalBinary].
var ErrTable = errors.New("bad page hash table")

// Table holds the hashes of a set of pages: Sums[k] is the hash of the
// k-th page set in Pages, in ascending order.
type Table struct {
	Pages *pagemap.Bitmap
	Sums  []Sum
}

// New returns a table over pages with room for every hash, all zero.
func New(pages *pagemap.Bitmap) *Table {
	return &Table{Pages: pages, Sums: make([]Sum, pages.Count())}
}

// Check reports whether t is consistent: one hash per page.
func (t *Table) Check() error {
	if t.Pages == nil {
		return fmt.Errorf("%w: no pages", ErrTable)
	}
	if n := t.Pages.Count(); uint64(len(t.Sums)) != n {
		return fmt.Errorf("%w: %d hashes for %d pages", ErrTable, len(t.Sums), n)
	}
	return nil
}

// EncodedLen is the length of the encoding of n hashes.
func EncodedLen(n uint64) uint64 { return n * Size }

// AppendSums appends the hashes, one after the other, to b.
func (t *Table) AppendSums(b []byte) []byte {
	for _, s := range t.Sums {
		b = append(b, s[:]...)
	}
	return b
}

// DecodeSums returns a table over pages whose hashes are data, as
// [Table.AppendSums] wrote them. data is untrusted: its length must be
// exactly one hash per page.
func DecodeSums(pages *pagemap.Bitmap, data []byte) (*Table, error) {
	n := pages.Count()
	if uint64(len(data)) != EncodedLen(n) {
		return nil, fmt.Errorf("%w: %d bytes for %d pages, want %d", ErrTable, len(data), n, EncodedLen(n))
	}
	t := &Table{Pages: pages, Sums: make([]Sum, n)}
	for i := range t.Sums {
		copy(t.Sums[i][:], data[i*Size:])
	}
	return t, nil
}

// Changed returns the pages of cur whose hash differs from base's: from
// the hash base has for the page, or fill for a page base does not hold
// (the hash of the page a restore of base writes there). Both tables must
// cover the same pages.
func Changed(cur, base *Table, fill Sum) (*pagemap.Bitmap, error) {
	if cur.Pages.Len() != base.Pages.Len() {
		return nil, fmt.Errorf("%w: tables of %d and %d pages", ErrTable, cur.Pages.Len(), base.Pages.Len())
	}
	out := pagemap.NewBitmap(cur.Pages.Len())
	x := base.Index()
	k := 0
	for start, count := range cur.Pages.Runs() {
		for p := start; p < start+count; p++ {
			b, ok := x.Get(p)
			if !ok {
				b = fill
			}
			if cur.Sums[k] != b {
				out.Set(p)
			}
			k++
		}
	}
	return out, nil
}

// Index looks up a table's hashes by page in constant time, from any
// number of goroutines; the table must not change afterwards.
type Index struct {
	t  *Table
	ri *pagemap.RankIndex
}

// Index returns an index of t.
func (t *Table) Index() *Index { return &Index{t: t, ri: t.Pages.RankIndex()} }

// Get returns the hash of page p and whether the table has it.
func (x *Index) Get(p uint64) (Sum, bool) {
	if p >= x.t.Pages.Len() || !x.t.Pages.Test(p) {
		return Sum{}, false
	}
	return x.t.Sums[x.ri.Rank(p)], true
}
