package writer

import (
	"errors"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// directBlock is the unit of direct I/O: a multiple of every logical block
// size a disk has (512 or 4096 bytes), and large enough to keep a disk busy.
const directBlock = 4 << 20

// directAlign is the alignment O_DIRECT asks of buffers, offsets and
// lengths: the logical block size, at most a page on the disks we meet.
const directAlign = 4096

// fileWriter writes the checkpoint file sequentially. Where the file system
// allows, it writes with O_DIRECT, in aligned blocks from an aligned buffer:
// the data goes from kvmckpt's buffer to the disk without first filling the
// page cache, whose write-back throttles a large writer to well under the
// disk's speed on some hosts (see BENCHMARKS.md). The last, partial block
// is written after O_DIRECT is turned off again. Where O_DIRECT is refused
// (tmpfs, some network file systems), it is an ordinary buffered writer.
//
// Not safe for concurrent use.
type fileWriter struct {
	f      *os.File
	buf    []byte // directBlock bytes, directAlign-aligned
	n      int    // bytes in buf
	off    int64  // file offset of buf[0]
	direct bool
}

func newFileWriter(f *os.File) *fileWriter {
	raw := make([]byte, directBlock+directAlign)
	skip := int(-uintptr(unsafe.Pointer(&raw[0])) & (directAlign - 1))
	fw := &fileWriter{f: f, buf: raw[skip : skip+directBlock]}
	fw.direct = setDirect(f, true) == nil
	return fw
}

// setDirect turns O_DIRECT on or off for f.
func setDirect(f *os.File, on bool) error {
	fd := int(f.Fd())
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return err
	}
	if on {
		flags |= unix.O_DIRECT
	} else {
		flags &^= unix.O_DIRECT
	}
	_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags)
	return err
}

func (fw *fileWriter) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		c := copy(fw.buf[fw.n:], p)
		fw.n += c
		p = p[c:]
		if fw.n == len(fw.buf) {
			if err := fw.writeBlock(fw.buf); err != nil {
				return written, err
			}
			fw.off += int64(fw.n)
			fw.n = 0
		}
		written += c
	}
	return written, nil
}

// writeBlock writes b at fw.off. A file system that takes the O_DIRECT
// flag but then refuses direct writes gets buffered ones from then on.
func (fw *fileWriter) writeBlock(b []byte) error {
	_, err := fw.f.WriteAt(b, fw.off)
	if err != nil && fw.direct && errors.Is(err, unix.EINVAL) {
		fw.direct = false
		if serr := setDirect(fw.f, false); serr != nil {
			return err
		}
		_, err = fw.f.WriteAt(b, fw.off)
	}
	return err
}

// Flush writes what is buffered. It may be called once, at the end: the
// partial block it writes leaves the file unaligned for direct writes.
func (fw *fileWriter) Flush() error {
	if fw.n == 0 {
		return nil
	}
	if fw.direct {
		fw.direct = false
		if err := setDirect(fw.f, false); err != nil {
			return err
		}
	}
	if err := fw.writeBlock(fw.buf[:fw.n]); err != nil {
		return err
	}
	fw.off += int64(fw.n)
	fw.n = 0
	return nil
}
