package pagemap

import (
	"encoding/binary"
	"fmt"
	"iter"
	"math/bits"
)

// PFN is a guest page frame number: a guest-physical address shifted right
// by the page shift. It is not a host address and not an index into a RAM
// file; RAM regions map guest-physical ranges to file offsets, and a PFN
// becomes a file page only through such a mapping.
type PFN uint64

// Bitmap is a dense set of page indices in [0, Len()), one bit per page,
// stored in 64-bit words. Bit i lives in word i/64 at bit position i%64, so
// the little-endian serialisation of the words is also the bit order of
// the kernel's bitmap helpers (include/linux/bitmap.h).
//
// Methods that take an index panic if it is out of range, as slice indexing
// does; the binary decoder never panics. A Bitmap is not safe for concurrent
// use when one goroutine modifies it, except that goroutines may set, clear
// and test pages of distinct 64-page words (ranges that start and end at
// multiples of 64) at once: every method touches only the words of the
// pages it names. Concurrent readers are fine.
type Bitmap struct {
	words []uint64
	n     uint64
}

// bitmapHeaderLen is the size of the bit count that precedes the words in
// the binary encoding.
const bitmapHeaderLen = 8

func wordsFor(n uint64) uint64 { return n/64 + min(n%64, 1) }

// NewBitmap returns an empty bitmap over n pages.
func NewBitmap(n uint64) *Bitmap {
	return &Bitmap{words: make([]uint64, wordsFor(n)), n: n}
}

// Len returns the number of pages the bitmap covers.
func (b *Bitmap) Len() uint64 { return b.n }

func (b *Bitmap) check(i uint64) {
	if i >= b.n {
		panic(fmt.Sprintf("pagemap: bit %d out of range [0, %d)", i, b.n))
	}
}

func (b *Bitmap) checkRange(start, count uint64) {
	if start > b.n || count > b.n-start {
		panic(fmt.Sprintf("pagemap: range [%d, %d+%d) out of range [0, %d)", start, start, count, b.n))
	}
}

// Set adds page i.
func (b *Bitmap) Set(i uint64) {
	b.check(i)
	b.words[i/64] |= 1 << (i % 64)
}

// Clear removes page i.
func (b *Bitmap) Clear(i uint64) {
	b.check(i)
	b.words[i/64] &^= 1 << (i % 64)
}

// Test reports whether page i is set.
func (b *Bitmap) Test(i uint64) bool {
	b.check(i)
	return b.words[i/64]&(1<<(i%64)) != 0
}

// SetRange sets the count pages starting at start.
func (b *Bitmap) SetRange(start, count uint64) {
	b.checkRange(start, count)
	b.applyRange(start, count, true)
}

// ClearRange clears the count pages starting at start.
func (b *Bitmap) ClearRange(start, count uint64) {
	b.checkRange(start, count)
	b.applyRange(start, count, false)
}

// applyRange sets or clears [start, start+count).
func (b *Bitmap) applyRange(start, count uint64, set bool) {
	for w, mask := range rangeMasks(start, count) {
		if set {
			b.words[w] |= mask
		} else {
			b.words[w] &^= mask
		}
	}
}

// AnyInRange reports whether a page of [start, start+count) is set.
func (b *Bitmap) AnyInRange(start, count uint64) bool {
	b.checkRange(start, count)
	for w, mask := range rangeMasks(start, count) {
		if b.words[w]&mask != 0 {
			return true
		}
	}
	return false
}

// rangeMasks yields the words that hold [start, start+count), a valid
// range, each with the mask of the range's bits in it: a partial first
// word, whole words, then a partial last word.
func rangeMasks(start, count uint64) iter.Seq2[uint64, uint64] {
	return func(yield func(w, mask uint64) bool) {
		if count == 0 {
			return
		}
		end := start + count // exclusive; checkRange ruled out overflow
		first, last := start/64, (end-1)/64
		for w := first; w <= last; w++ {
			mask := ^uint64(0)
			if w == first {
				mask &= ^uint64(0) << (start % 64)
			}
			if w == last && end%64 != 0 {
				mask &= ^uint64(0) >> (64 - end%64)
			}
			if !yield(w, mask) {
				return
			}
		}
	}
}

// Count returns the number of set pages.
func (b *Bitmap) Count() uint64 {
	var c int
	for _, w := range b.words {
		c += bits.OnesCount64(w)
	}
	return uint64(c)
}

// NextSet returns the first set page at or after i, or (Len(), false) if
// there is none. Any i is allowed, including i >= Len().
func (b *Bitmap) NextSet(i uint64) (uint64, bool) {
	if i >= b.n {
		return b.n, false
	}
	w := i / 64
	word := b.words[w] >> (i % 64)
	if word != 0 {
		return i + uint64(bits.TrailingZeros64(word)), true
	}
	for w++; w < uint64(len(b.words)); w++ {
		if b.words[w] != 0 {
			// Bits past n are always zero, so the result is below n.
			return w*64 + uint64(bits.TrailingZeros64(b.words[w])), true
		}
	}
	return b.n, false
}

// NextClear returns the first clear page at or after i, or (Len(), false)
// if there is none. Any i is allowed, including i >= Len().
func (b *Bitmap) NextClear(i uint64) (uint64, bool) {
	if i >= b.n {
		return b.n, false
	}
	w := i / 64
	word := ^b.words[w] >> (i % 64)
	if word != 0 {
		if j := i + uint64(bits.TrailingZeros64(word)); j < b.n {
			return j, true
		}
		return b.n, false
	}
	for w++; w < uint64(len(b.words)); w++ {
		if b.words[w] != ^uint64(0) {
			if j := w*64 + uint64(bits.TrailingZeros64(^b.words[w])); j < b.n {
				return j, true
			}
			return b.n, false
		}
	}
	return b.n, false
}

// Runs returns an iterator over the maximal runs of set pages, in
// ascending order, as (start, count) pairs. It skips clear words without
// looking at their bits, so it costs one step per word plus one per run.
// The bitmap must not be modified during iteration.
func (b *Bitmap) Runs() iter.Seq2[uint64, uint64] {
	return func(yield func(start, count uint64) bool) {
		for i := uint64(0); ; {
			start, ok := b.NextSet(i)
			if !ok {
				return
			}
			end, _ := b.NextClear(start)
			if !yield(start, end-start) {
				return
			}
			i = end
		}
	}
}

// ClearRuns is [Bitmap.Runs] for the clear pages.
func (b *Bitmap) ClearRuns() iter.Seq2[uint64, uint64] {
	return func(yield func(start, count uint64) bool) {
		for i := uint64(0); ; {
			start, ok := b.NextClear(i)
			if !ok {
				return
			}
			end, _ := b.NextSet(start)
			if !yield(start, end-start) {
				return
			}
			i = end
		}
	}
}

// All returns an iterator over the set pages in ascending order.
func (b *Bitmap) All() iter.Seq[uint64] {
	return func(yield func(uint64) bool) {
		for w, word := range b.words {
			for word != 0 {
				i := uint64(w)*64 + uint64(bits.TrailingZeros64(word))
				if !yield(i) {
					return
				}
				word &= word - 1
			}
		}
	}
}

// Clone returns a copy of b.
func (b *Bitmap) Clone() *Bitmap {
	return &Bitmap{words: append([]uint64(nil), b.words...), n: b.n}
}

// Equal reports whether b and o cover the same number of pages and have
// the same pages set.
func (b *Bitmap) Equal(o *Bitmap) bool {
	if b.n != o.n {
		return false
	}
	for i, w := range b.words {
		if o.words[i] != w {
			return false
		}
	}
	return true
}

func (b *Bitmap) sameLen(op string, o *Bitmap) {
	if b.n != o.n {
		panic(fmt.Sprintf("pagemap: %s of bitmaps of lengths %d and %d", op, b.n, o.n))
	}
}

// And keeps in b only the pages also set in o. It panics if the bitmaps
// differ in length.
func (b *Bitmap) And(o *Bitmap) {
	b.sameLen("And", o)
	for i := range b.words {
		b.words[i] &= o.words[i]
	}
}

// AndNot removes from b the pages set in o. It panics if the bitmaps
// differ in length.
func (b *Bitmap) AndNot(o *Bitmap) {
	b.sameLen("AndNot", o)
	for i := range b.words {
		b.words[i] &^= o.words[i]
	}
}

// Or adds to b the pages set in o. It panics if the bitmaps differ in
// length.
func (b *Bitmap) Or(o *Bitmap) {
	b.sameLen("Or", o)
	for i := range b.words {
		b.words[i] |= o.words[i]
	}
}

// EncodedLen returns the length of the binary encoding of a bitmap over n
// pages, or false if it does not fit in a uint64.
func EncodedLen(n uint64) (uint64, bool) {
	w := wordsFor(n)
	if w > (^uint64(0)-bitmapHeaderLen)/8 {
		return 0, false
	}
	return bitmapHeaderLen + 8*w, true
}

// AppendBinary appends the binary encoding of b to buf: the page count as
// a little-endian uint64, then the words, each a little-endian uint64.
// Bits past Len() are zero.
func (b *Bitmap) AppendBinary(buf []byte) ([]byte, error) {
	buf = binary.LittleEndian.AppendUint64(buf, b.n)
	for _, w := range b.words {
		buf = binary.LittleEndian.AppendUint64(buf, w)
	}
	return buf, nil
}

// MarshalBinary returns the encoding described at [Bitmap.AppendBinary].
func (b *Bitmap) MarshalBinary() ([]byte, error) {
	n, _ := EncodedLen(b.n) // an existing bitmap's encoding always fits
	return b.AppendBinary(make([]byte, 0, n))
}

// UnmarshalBinary replaces b with the bitmap encoded in data, the encoding
// described at [Bitmap.AppendBinary]. The data is untrusted: the page
// count must agree with the length of data, so the allocation is bounded by
// len(data), and bits past the page count must be clear. Errors wrap
// [ErrBitmapEncoding].
func (b *Bitmap) UnmarshalBinary(data []byte) error {
	if len(data) < bitmapHeaderLen {
		return fmt.Errorf("decode bitmap: %d bytes, shorter than its %d-byte header: %w",
			len(data), bitmapHeaderLen, ErrBitmapEncoding)
	}
	n := binary.LittleEndian.Uint64(data)
	want, ok := EncodedLen(n)
	if !ok || want != uint64(len(data)) {
		return fmt.Errorf("decode bitmap: %d pages need %d bytes, have %d: %w",
			n, want, len(data), ErrBitmapEncoding)
	}
	words := make([]uint64, (len(data)-bitmapHeaderLen)/8)
	for i := range words {
		words[i] = binary.LittleEndian.Uint64(data[bitmapHeaderLen+8*i:])
	}
	if tail := n % 64; tail != 0 && words[len(words)-1]>>tail != 0 {
		return fmt.Errorf("decode bitmap: bits set past page count %d: %w", n, ErrBitmapEncoding)
	}
	b.words, b.n = words, n
	return nil
}

// Rank returns the number of set pages below i; i may be up to Len().
func (b *Bitmap) Rank(i uint64) uint64 {
	if i > b.n {
		panic(fmt.Sprintf("pagemap: rank %d out of range [0, %d]", i, b.n))
	}
	var c int
	w := i / 64
	for _, x := range b.words[:w] {
		c += bits.OnesCount64(x)
	}
	if r := i % 64; r != 0 {
		c += bits.OnesCount64(b.words[w] & (1<<r - 1))
	}
	return uint64(c)
}

// SubsetOf reports whether every page set in b is set in o; both must
// have the same length.
func (b *Bitmap) SubsetOf(o *Bitmap) bool {
	b.sameLen("subset", o)
	for i, w := range b.words {
		if w&^o.words[i] != 0 {
			return false
		}
	}
	return true
}

// CountRange returns the number of set pages in [start, start+count).
func (b *Bitmap) CountRange(start, count uint64) uint64 {
	b.checkRange(start, count)
	var c int
	for w, mask := range rangeMasks(start, count) {
		c += bits.OnesCount64(b.words[w] & mask)
	}
	return uint64(c)
}

// RankIndex answers [Bitmap.Rank] in constant time, for a bitmap that no
// longer changes: 8 bytes per 64 pages.
type RankIndex struct {
	b   *Bitmap
	cum []uint64 // cum[w] is the number of set pages in words [0, w)
}

// RankIndex indexes b, which must not change afterwards.
func (b *Bitmap) RankIndex() *RankIndex {
	ri := &RankIndex{b: b, cum: make([]uint64, len(b.words)+1)}
	for w, x := range b.words {
		ri.cum[w+1] = ri.cum[w] + uint64(bits.OnesCount64(x))
	}
	return ri
}

// Rank is [Bitmap.Rank].
func (ri *RankIndex) Rank(i uint64) uint64 {
	if i > ri.b.n {
		panic(fmt.Sprintf("pagemap: rank %d out of range [0, %d]", i, ri.b.n))
	}
	w, r := i/64, i%64
	c := ri.cum[w]
	if r != 0 {
		c += uint64(bits.OnesCount64(ri.b.words[w] & (1<<r - 1)))
	}
	return c
}
