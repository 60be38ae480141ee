package profiles

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"hash/crc64"
	"io"
	"slices"

	"github.com/ulikunitz/xz/lzma"
)

// The kernel compresses x86 bzImages with `xz --check=crc32 --x86
// --lzma2=...` (scripts/xz_wrap.sh): an LZMA2 stream behind the x86 BCJ
// filter. github.com/ulikunitz/xz decodes LZMA2 but no BCJ filter, so
// this file parses the .xz container itself (The .xz File Format 1.2.1,
// https://tukaani.org/xz/xz-file-format.txt) and applies the filter.

var xzMagic = []byte{0xfd, '7', 'z', 'X', 'Z', 0}

const (
	xzFilterX86   = 0x04
	xzFilterLZMA2 = 0x21
	xzCheckNone   = 0x00
	xzCheckCRC32  = 0x01
	xzCheckCRC64  = 0x04
	xzCheckSHA256 = 0x0a
)

var crc64Table = crc64.MakeTable(crc64.ECMA)

// decodeXZ decodes the blocks of the first stream of an .xz file; the
// index and footer are not needed to decode and are not read.
func decodeXZ(stream []byte, hint, limit int) ([]byte, error) {
	if len(stream) < 12 || !bytes.HasPrefix(stream, xzMagic) {
		return nil, formatErr("xz", 0, "bad stream header")
	}
	if crc32.ChecksumIEEE(stream[6:8]) != le32(stream, 8) {
		return nil, formatErr("xz", 6, "stream flags CRC mismatch")
	}
	if stream[6] != 0 || stream[7]&0xf0 != 0 {
		return nil, formatErr("xz", 6, "reserved stream flags set")
	}
	check := stream[7]
	checkSize := 0
	if check != 0 {
		checkSize = 4 << ((check - 1) / 3) // 4, 8, 16, 32, 64 bytes by groups of three IDs
	}
	out := make([]byte, 0, hint)
	pos := 12
	for {
		if pos >= len(stream) {
			return nil, formatErr("xz", int64(pos), "truncated before index")
		}
		if stream[pos] == 0 {
			return out, nil // index indicator: no more blocks
		}
		start := len(out)
		n, err := decodeXZBlock(stream, pos, &out, limit)
		if err != nil {
			return nil, err
		}
		if err := verifyXZCheck(check, out[start:], stream, pos+n, checkSize); err != nil {
			return nil, err
		}
		pos += n + checkSize
	}
}

// decodeXZBlock decodes the block at pos, appending its output to *out
// (which must stay within limit), and returns the block's length up to
// the check field (header, data, padding).
func decodeXZBlock(s []byte, pos int, out *[]byte, limit int) (int, error) {
	hsize := (int(s[pos]) + 1) * 4
	if hsize > len(s)-pos {
		return 0, formatErr("xz", int64(pos), "truncated block header")
	}
	h := s[pos : pos+hsize]
	if crc32.ChecksumIEEE(h[:hsize-4]) != le32(h, hsize-4) {
		return 0, formatErr("xz", int64(pos), "block header CRC mismatch")
	}
	flags := h[1]
	if flags&0x3c != 0 {
		return 0, formatErr("xz", int64(pos+1), "reserved block flags set")
	}
	p := 2
	compSize, uncompSize := int64(-1), int64(-1)
	var err error
	if flags&0x40 != 0 {
		if compSize, p, err = xzVLI(h, p, hsize-4); err != nil {
			return 0, err
		}
	}
	if flags&0x80 != 0 {
		if uncompSize, p, err = xzVLI(h, p, hsize-4); err != nil {
			return 0, err
		}
	}
	nf := int(flags&3) + 1
	type filter struct {
		id    int64
		props []byte
	}
	filters := make([]filter, 0, nf)
	for range nf {
		var id, psize int64
		if id, p, err = xzVLI(h, p, hsize-4); err != nil {
			return 0, err
		}
		if psize, p, err = xzVLI(h, p, hsize-4); err != nil {
			return 0, err
		}
		if psize > int64(hsize-4-p) {
			return 0, formatErr("xz", int64(pos+p), "filter properties overrun the block header")
		}
		filters = append(filters, filter{id, h[p : p+int(psize)]})
		p += int(psize)
	}
	if !allZero(h[p : hsize-4]) {
		return 0, formatErr("xz", int64(pos+p), "nonzero block header padding")
	}

	// Only the chains the kernel uses: [x86 BCJ,] LZMA2.
	last := filters[len(filters)-1]
	if last.id != xzFilterLZMA2 || len(last.props) != 1 || last.props[0] > 40 {
		return 0, fmt.Errorf("xz filter %#x: %w", last.id, ErrUnsupportedCompression)
	}
	bcj, bcjStart := false, uint32(0)
	for _, f := range filters[:len(filters)-1] {
		if f.id != xzFilterX86 || bcj || (len(f.props) != 0 && len(f.props) != 4) {
			return 0, fmt.Errorf("xz filter chain with %#x: %w", f.id, ErrUnsupportedCompression)
		}
		bcj = true
		if len(f.props) == 4 {
			bcjStart = binary.LittleEndian.Uint32(f.props)
		}
	}

	data := s[pos+hsize:]
	n, unpacked, err := lzma2Extent(data)
	if err != nil {
		return 0, &FormatError{What: "xz", Off: int64(pos + hsize), Msg: "LZMA2 data", Err: err}
	}
	if (compSize >= 0 && compSize != int64(n)) || (uncompSize >= 0 && uncompSize != unpacked) {
		return 0, formatErr("xz", int64(pos), "block sizes in header do not match the data")
	}
	if unpacked > int64(limit-len(*out)) {
		return 0, fmt.Errorf("xz output exceeds the limit: %w", ErrTooLarge)
	}
	// The dictionary needs to reach no further back than the output is
	// long; allocate no more than that.
	dictCap := max(min(lzma2DictSize(last.props[0]), unpacked), lzma.MinDictCap)
	r, err := lzma.Reader2Config{DictCap: int(dictCap)}.NewReader2(bytes.NewReader(data[:n]))
	if err != nil {
		return 0, &FormatError{What: "xz", Off: int64(pos + hsize), Msg: "LZMA2 setup", Err: err}
	}
	start := len(*out)
	*out = slices.Grow(*out, int(unpacked))[:start+int(unpacked)]
	blk := (*out)[start:]
	if _, err := io.ReadFull(r, blk); err != nil {
		return 0, &FormatError{What: "xz", Off: int64(pos + hsize), Msg: "LZMA2 data", Err: err}
	}
	if bcj {
		bcjX86Decode(blk, bcjStart)
	}
	end := pos + hsize + n
	padded := (end + 3) &^ 3 // block padding: block size multiple of 4
	if padded > len(s) || !allZero(s[end:padded]) {
		return 0, formatErr("xz", int64(end), "bad block padding")
	}
	return padded - pos, nil
}

func verifyXZCheck(check byte, blk, s []byte, at, size int) error {
	if size > len(s)-at {
		return formatErr("xz", int64(at), "truncated block check")
	}
	want := s[at : at+size]
	var got []byte
	switch check {
	case xzCheckNone:
		return nil
	case xzCheckCRC32:
		got = binary.LittleEndian.AppendUint32(nil, crc32.ChecksumIEEE(blk))
	case xzCheckCRC64:
		got = binary.LittleEndian.AppendUint64(nil, crc64.Checksum(blk, crc64Table))
	case xzCheckSHA256:
		sum := sha256.Sum256(blk)
		got = sum[:]
	default:
		return nil // reserved check types: skipped, as xz(1) allows
	}
	if !bytes.Equal(got, want) {
		return formatErr("xz", int64(at), "block check mismatch")
	}
	return nil
}

// xzVLI decodes a variable-length integer (at most 9 bytes of 7 bits).
func xzVLI(b []byte, p, end int) (int64, int, error) {
	var v uint64
	for i := 0; i < 9; i++ {
		if p >= end {
			return 0, 0, formatErr("xz", int64(p), "truncated integer")
		}
		c := b[p]
		p++
		v |= uint64(c&0x7f) << (7 * i)
		if c&0x80 == 0 {
			if (c == 0 && i > 0) || v > 1<<62 {
				return 0, 0, formatErr("xz", int64(p-1), "bad integer")
			}
			return int64(v), p, nil
		}
	}
	return 0, 0, formatErr("xz", int64(p), "integer too long")
}

// lzma2DictSize decodes the LZMA2 dictionary size property.
func lzma2DictSize(b byte) int64 {
	if b == 40 {
		return 0xffffffff
	}
	return int64(2|b&1) << (b/2 + 11)
}

// lzma2Extent walks the LZMA2 chunk headers, without decoding, and returns
// the length of the stream including its end marker and the total size
// it decodes to. Control bytes: 0x00 end; 0x01, 0x02 uncompressed chunk
// with a 16-bit big-endian size-1; 0x80-0xff LZMA chunk with 21-bit
// unpacked size-1, 16-bit packed size-1, and a properties byte if >= 0xc0.
func lzma2Extent(d []byte) (int, int64, error) {
	pos := 0
	var unpacked int64
	for {
		if pos >= len(d) {
			return 0, 0, fmt.Errorf("no end marker")
		}
		c := d[pos]
		switch {
		case c == 0x00:
			return pos + 1, unpacked, nil
		case c == 0x01 || c == 0x02:
			if len(d)-pos < 3 {
				return 0, 0, fmt.Errorf("truncated chunk header")
			}
			n := int(binary.BigEndian.Uint16(d[pos+1:])) + 1
			unpacked += int64(n)
			pos += 3 + n
		case c >= 0x80:
			hdr := 5
			if c >= 0xc0 {
				hdr = 6
			}
			if len(d)-pos < hdr {
				return 0, 0, fmt.Errorf("truncated chunk header")
			}
			unpacked += (int64(c&0x1f)<<16 | int64(binary.BigEndian.Uint16(d[pos+1:]))) + 1
			pos += hdr + int(binary.BigEndian.Uint16(d[pos+3:])) + 1
		default:
			return 0, 0, fmt.Errorf("bad control byte %#x at %#x", c, pos)
		}
		if pos > len(d) {
			return 0, 0, fmt.Errorf("chunk overruns the data")
		}
	}
}

// bcjX86Decode undoes the x86 branch converter in place. The encoder
// turns the relative 32-bit operand of CALL (0xe8) and JMP (0xe9) into an
// absolute one (operand + position + 5) so that repeated calls to one
// function compress well; decoding subtracts again. Which 0xe8/0xe9
// bytes were converted is decided from the bytes themselves, identically
// in both directions: the operand's top byte must be 0x00 or 0xff (a
// near target), and an opcode byte found among the previous three bytes
// may veto the conversion, depending on where it was and whether its own
// top byte looked like a near target. This follows the behaviour of
// liblzma's x86 filter (src/liblzma/simple/x86.c), which defines the
// format; start is the filter's start offset property.
func bcjX86Decode(buf []byte, start uint32) {
	// history records, for the last 3 positions before the current
	// opcode, unconverted opcode bytes (low bits) and whether their top
	// operand byte looked near (bit 4), shifted one place per byte.
	// allowed and flipBit are indexed by the low 3 history bits.
	allowed := [8]bool{true, true, true, false, true, false, false, false}
	flipBit := [8]uint{0, 1, 2, 2, 3, 3, 3, 3}
	near := func(b byte) bool { return b == 0 || b == 0xff }

	var history uint32
	last := -5 // position of the previous opcode byte; far away at first
	for i := 0; i+5 <= len(buf); {
		if op := buf[i]; op != 0xe8 && op != 0xe9 {
			i++
			continue
		}
		if gap := i - last; gap > 5 {
			history = 0
		} else {
			for range gap {
				history = (history & 0x77) << 1
			}
		}
		last = i
		top := buf[i+4]
		if !near(top) || !allowed[(history>>1)&7] || history>>1 >= 0x10 {
			i++
			history |= 1
			if near(top) {
				history |= 0x10
			}
			continue
		}
		v := binary.LittleEndian.Uint32(buf[i+1:])
		var dest uint32
		for {
			dest = v - (start + uint32(i) + 5)
			if history == 0 {
				break
			}
			shift := 24 - 8*flipBit[(history>>1)&7]
			if !near(byte(dest >> shift)) {
				break
			}
			v = dest ^ (1<<(shift+8) - 1)
		}
		// Bits 25-31 of the operand are a sign extension of bit 24.
		dest &= 0x01ffffff
		if dest&0x01000000 != 0 {
			dest |= 0xff000000
		}
		binary.LittleEndian.PutUint32(buf[i+1:], dest)
		i += 5
		history = 0
	}
}
