package profiles

import "encoding/binary"

// kernelImage is a kernel image as mapped in virtual memory: data[0] is at
// virtual address base. All accessors bound-check and report failure
// instead of panicking; the bytes are untrusted.
type kernelImage struct {
	data []byte
	base uint64
}

// off converts a virtual address to an offset into data, if the n bytes
// at addr lie inside the image.
func (m kernelImage) off(addr uint64, n int) (int, bool) {
	if addr < m.base || n < 0 {
		return 0, false
	}
	o := addr - m.base
	if o > uint64(len(m.data)) || uint64(n) > uint64(len(m.data))-o {
		return 0, false
	}
	return int(o), true
}

// bytes returns the n bytes at addr.
func (m kernelImage) bytes(addr uint64, n int) ([]byte, bool) {
	o, ok := m.off(addr, n)
	if !ok {
		return nil, false
	}
	return m.data[o : o+n], true
}

// rangeBytes returns the bytes of the half-open range [start, end).
func (m kernelImage) rangeBytes(start, end uint64) ([]byte, bool) {
	if end < start || end-start > uint64(len(m.data)) {
		return nil, false
	}
	return m.bytes(start, int(end-start))
}

// u64 reads a little-endian 64-bit value at addr.
func (m kernelImage) u64(addr uint64) (uint64, bool) {
	b, ok := m.bytes(addr, 8)
	if !ok {
		return 0, false
	}
	return binary.LittleEndian.Uint64(b), true
}

// cstring reads a NUL-terminated string of at most max bytes at addr.
func (m kernelImage) cstring(addr uint64, max int) (string, bool) {
	o, ok := m.off(addr, 1)
	if !ok {
		return "", false
	}
	end := min(len(m.data), o+max)
	for i := o; i < end; i++ {
		if m.data[i] == 0 {
			return string(m.data[o:i]), true
		}
	}
	return "", false
}

// addr converts an offset into data back to a virtual address.
func (m kernelImage) addr(off int) uint64 { return m.base + uint64(off) }

func le16(b []byte, o int) uint16 { return binary.LittleEndian.Uint16(b[o:]) }
func le32(b []byte, o int) uint32 { return binary.LittleEndian.Uint32(b[o:]) }
func le64(b []byte, o int) uint64 { return binary.LittleEndian.Uint64(b[o:]) }
