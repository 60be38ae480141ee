package profiles

import (
	"bytes"
	"compress/bzip2"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	kgzip "github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4/v4"
	"github.com/ulikunitz/xz/lzma"
)

const (
	// maxBzImage bounds the bzImage file read into memory.
	maxBzImage = 256 << 20
	// maxVmlinux bounds what a payload may decompress to. x86_64's
	// KERNEL_IMAGE_SIZE is 1 GiB; a vmlinux without debug info is far
	// smaller (Debian 6.1: 63 MiB).
	maxVmlinux = 1 << 30
)

// bzImage setup header fields (Documentation/x86/boot.rst,
// arch/x86/boot/header.S). Offsets are from the start of the file.
const (
	hdrSetupSects   = 0x1f1
	hdrBootFlag     = 0x1fe // 0xAA55
	hdrMagic        = 0x202 // "HdrS"
	hdrVersion      = 0x206
	hdrPayloadOff   = 0x248 // protocol 2.08+, from the protected-mode code
	hdrPayloadLen   = 0x24c
	hdrPrefAddress  = 0x258 // protocol 2.10+, LOAD_PHYSICAL_ADDR
	hdrMinLen       = 0x260
	bootProtocol208 = 0x0208
	bootProtocol210 = 0x020a
)

// bzImagePayload returns the compressed payload of an x86 bzImage and the
// kernel's preferred load address (0 if the protocol predates it).
func bzImagePayload(b []byte) ([]byte, uint64, error) {
	if len(b) < hdrMinLen || le16(b, hdrBootFlag) != 0xaa55 || string(b[hdrMagic:hdrMagic+4]) != "HdrS" {
		return nil, 0, ErrNotKernelImage
	}
	version := le16(b, hdrVersion)
	if version < bootProtocol208 {
		return nil, 0, formatErr("bzImage", hdrVersion, "boot protocol %d.%02d predates payload_offset (2.08)", version>>8, version&0xff)
	}
	sects := int(b[hdrSetupSects])
	if sects == 0 {
		sects = 4 // boot.rst: "if this field is 0, the real value is 4"
	}
	setup := uint64(sects+1) * 512
	start := setup + uint64(le32(b, hdrPayloadOff))
	n := uint64(le32(b, hdrPayloadLen))
	if start > uint64(len(b)) || n > uint64(len(b))-start || n < 8 {
		return nil, 0, formatErr("bzImage", hdrPayloadOff, "payload [%#x, %#x) is outside the %d-byte file", start, start+n, len(b))
	}
	var pref uint64
	if version >= bootProtocol210 {
		pref = le64(b, hdrPrefAddress)
	}
	return b[start : start+n], pref, nil
}

// compression is one payload format the kernel can be compressed with.
type compression struct {
	name  string
	magic []byte
	// decode decompresses stream (payload without the size trailer),
	// preallocating up to hint bytes and failing past limit.
	decode func(stream []byte, hint, limit int) ([]byte, error)
}

// compressions are matched on the magic bytes lib/decompress.c
// compressed_formats[] matches (the first two); the decoders check the
// rest.
var compressions = []compression{
	{"gzip", []byte{0x1f, 0x8b}, decodeGzip},
	{"bzip2", []byte{'B', 'Z'}, decodeBzip2},
	{"lzma", []byte{0x5d, 0x00}, decodeLZMA},
	{"xz", []byte{0xfd, '7'}, decodeXZ},
	{"lzo", []byte{0x89, 'L'}, nil},
	{"lz4", []byte{0x02, 0x21}, decodeLZ4Legacy},
	{"zstd", []byte{0x28, 0xb5}, decodeZstd},
}

// decompressPayload decompresses a bzImage payload. Every payload ends in
// the uncompressed size as 32-bit little endian: gzip's ISIZE, or for the
// other formats the trailer scripts/Makefile.lib size_append adds. The
// output must match it.
func decompressPayload(p []byte, limit int) ([]byte, string, error) {
	if len(p) < 8 {
		return nil, "", formatErr("bzImage payload", 0, "only %d bytes", len(p))
	}
	for _, c := range compressions {
		if !bytes.HasPrefix(p, c.magic) {
			continue
		}
		if c.decode == nil {
			return nil, c.name, fmt.Errorf("%s payload: %w", c.name, ErrUnsupportedCompression)
		}
		size := binary.LittleEndian.Uint32(p[len(p)-4:])
		stream := p[:len(p)-4]
		if c.name == "gzip" {
			stream = p
		}
		// Kernels compress 4-10x; do not preallocate more than that on
		// the word of a trailer.
		hint := min(int(size), limit, 32*len(p)+1<<20)
		out, err := c.decode(stream, hint, limit)
		if err != nil {
			return nil, c.name, fmt.Errorf("decompress %s payload: %w", c.name, err)
		}
		if uint32(len(out)) != size {
			return nil, c.name, formatErr(c.name, int64(len(p)-4), "decompressed to %d bytes, trailer says %d", len(out), size)
		}
		return out, c.name, nil
	}
	return nil, "", fmt.Errorf("payload magic % x: %w", p[:2], ErrUnsupportedCompression)
}

// readLimited reads r to the end, failing past limit.
func readLimited(r io.Reader, hint, limit int) ([]byte, error) {
	var buf bytes.Buffer
	buf.Grow(hint + bytes.MinRead)
	if _, err := buf.ReadFrom(io.LimitReader(r, int64(limit)+1)); err != nil {
		return nil, err
	}
	if buf.Len() > limit {
		return nil, fmt.Errorf("decompressed data exceeds %d bytes: %w", limit, ErrTooLarge)
	}
	return buf.Bytes(), nil
}

func decodeGzip(stream []byte, hint, limit int) ([]byte, error) {
	zr, err := kgzip.NewReader(bytes.NewReader(stream))
	if err != nil {
		return nil, &FormatError{What: "gzip", Off: 0, Msg: "header", Err: err}
	}
	zr.Multistream(false)
	out, err := readLimited(zr, hint, limit)
	if err != nil {
		return nil, wrapCodec("gzip", err)
	}
	return out, nil
}

func decodeBzip2(stream []byte, hint, limit int) ([]byte, error) {
	out, err := readLimited(bzip2.NewReader(bytes.NewReader(stream)), hint, limit)
	if err != nil {
		return nil, wrapCodec("bzip2", err)
	}
	return out, nil
}

// decodeLZMA decodes the .lzma ("LZMA alone") format that `lzma -9`
// writes: properties byte, 32-bit dictionary size, 64-bit size (all ones
// when unknown), then the stream.
func decodeLZMA(stream []byte, hint, limit int) ([]byte, error) {
	if len(stream) < lzma.HeaderLen {
		return nil, formatErr("lzma", 0, "truncated header")
	}
	// The dictionary is allocated at the size the header states. No match
	// can reach further back than the output is long, so cap it by the
	// expected size: lzma -9 asks for 64 MiB.
	hdr := bytes.Clone(stream[:lzma.HeaderLen])
	dict := int(binary.LittleEndian.Uint32(hdr[1:]))
	capDict := max(min(dict, hint, limit), lzma.MinDictCap)
	binary.LittleEndian.PutUint32(hdr[1:], uint32(capDict))
	r, err := lzma.ReaderConfig{DictCap: max(capDict, lzma.MinDictCap)}.NewReader(
		io.MultiReader(bytes.NewReader(hdr), bytes.NewReader(stream[lzma.HeaderLen:])))
	if err != nil {
		return nil, &FormatError{What: "lzma", Off: 0, Msg: "header", Err: err}
	}
	out, err := readLimited(r, hint, limit)
	if err != nil {
		return nil, wrapCodec("lzma", err)
	}
	return out, nil
}

// lz4LegacyMagic starts the lz4 legacy frame format (lz4 -l), which the
// kernel uses: then 32-bit little-endian compressed sizes, each followed
// by a block that decompresses to at most 8 MiB (lib/decompress_unlz4.c).
const (
	lz4LegacyMagic = 0x184c2102
	lz4LegacyBlock = 8 << 20
)

func decodeLZ4Legacy(stream []byte, hint, limit int) ([]byte, error) {
	maxChunk := lz4.CompressBlockBound(lz4LegacyBlock)
	out := make([]byte, 0, hint)
	pos := 0
	for pos < len(stream) {
		if len(stream)-pos < 4 {
			return nil, formatErr("lz4", int64(pos), "truncated chunk size")
		}
		n := int(binary.LittleEndian.Uint32(stream[pos:]))
		pos += 4
		if n == lz4LegacyMagic {
			continue // start of (another) legacy frame
		}
		if n == 0 || n > maxChunk || n > len(stream)-pos {
			return nil, formatErr("lz4", int64(pos-4), "bad chunk size %d", n)
		}
		if cap(out)-len(out) < lz4LegacyBlock {
			grown := make([]byte, len(out), max(2*cap(out), len(out)+lz4LegacyBlock))
			copy(grown, out)
			out = grown
		}
		k, err := lz4.UncompressBlock(stream[pos:pos+n], out[len(out):len(out)+lz4LegacyBlock])
		if err != nil {
			return nil, &FormatError{What: "lz4", Off: int64(pos), Msg: "block", Err: err}
		}
		out = out[:len(out)+k]
		pos += n
		if len(out) > limit {
			return nil, fmt.Errorf("lz4 output exceeds %d bytes: %w", limit, ErrTooLarge)
		}
	}
	return out, nil
}

func decodeZstd(stream []byte, hint, limit int) ([]byte, error) {
	dec, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(1),
		zstd.WithDecoderMaxMemory(uint64(limit)),
		zstd.WithDecoderMaxWindow(uint64(min(limit, zstd.MaxWindowSize))))
	if err != nil {
		return nil, fmt.Errorf("set up zstd: %w", err)
	}
	defer dec.Close()
	out, err := dec.DecodeAll(stream, make([]byte, 0, hint))
	if err != nil {
		return nil, wrapCodec("zstd", err)
	}
	if len(out) > limit {
		return nil, fmt.Errorf("zstd output exceeds %d bytes: %w", limit, ErrTooLarge)
	}
	return out, nil
}

// wrapCodec turns a decoder's error into a FormatError, keeping
// ErrTooLarge recognisable.
func wrapCodec(name string, err error) error {
	switch {
	case errors.Is(err, ErrTooLarge):
		return err
	case errors.Is(err, zstd.ErrDecoderSizeExceeded), errors.Is(err, zstd.ErrWindowSizeExceeded):
		return fmt.Errorf("%s: %v: %w", name, err, ErrTooLarge)
	}
	return &FormatError{What: name, Off: -1, Msg: "decode", Err: err}
}
