package writer

// CRC-32C of a concatenation from the CRCs of its parts, so that a patched
// raw chunk's CRC costs the changed pages, not the whole chunk.
//
// A CRC is the remainder of the message polynomial (pre- and post-
// conditioned with all ones) modulo the CRC's polynomial P. Appending n
// zero bytes to a message multiplies its unconditioned remainder by
// x^(8n) mod P, and the conditioning of the two parts cancels out, so
//
//	crc(A || B) = crc(A) · x^(8·len(B)) mod P  ⊕  crc(B).
//
// Polynomials are in the reflected bit order of crc32.Castagnoli (bit 31
// is x^0), so multiplication shifts right and reduces by the reflected
// polynomial.

// castagnoliReflected is P, reflected (hash/crc32.Castagnoli).
const castagnoliReflected = 0x82f63b78

// gfMul returns a·b mod P.
func gfMul(a, b uint32) uint32 {
	var p uint32
	for m := uint32(1) << 31; m != 0; m >>= 1 {
		if a&m != 0 {
			p ^= b
		}
		// b·x mod P
		if b&1 != 0 {
			b = b>>1 ^ castagnoliReflected
		} else {
			b >>= 1
		}
	}
	return p
}

// xPow8n returns x^(8n) mod P.
func xPow8n(n int) uint32 {
	result := uint32(1) << 31 // x^0
	sq := uint32(1) << 23     // x^8
	for ; n > 0; n >>= 1 {
		if n&1 != 0 {
			result = gfMul(result, sq)
		}
		sq = gfMul(sq, sq)
	}
	return result
}

// pageShift is x^(8·PageSize) mod P; multiplication by it, which is
// linear, is four table lookups, one per byte of the factor.
var pageShift, pageShiftTable = func() (uint32, [4][256]uint32) {
	s := xPow8n(PageSize)
	var t [4][256]uint32
	for k := range 4 {
		for v := range 256 {
			t[k][v] = gfMul(uint32(v)<<(8*k), s)
		}
	}
	return s, t
}()

func mulPageShift(c uint32) uint32 {
	t := &pageShiftTable
	return t[0][c&0xff] ^ t[1][c>>8&0xff] ^ t[2][c>>16&0xff] ^ t[3][c>>24]
}

// crcCombinePages returns the CRC of the concatenation of pages whose CRCs
// are given, each PageSize bytes.
func crcCombinePages(crcs []uint32) uint32 {
	if len(crcs) == 0 {
		return crc(nil)
	}
	c := crcs[0]
	for _, next := range crcs[1:] {
		c = mulPageShift(c) ^ next
	}
	return c
}

// crcCombine returns the CRC of A || B from crc(A), crc(B) and len(B).
func crcCombine(crcA, crcB uint32, lenB int) uint32 {
	if lenB == 0 {
		return crcA
	}
	return gfMul(crcA, xPow8n(lenB)) ^ crcB
}
