package ramblock

import (
	"bytes"
	"errors"
	"os"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

func addr(b []byte) uint64 { return uint64(uintptr(unsafe.Pointer(&b[0]))) }

func mmap(t *testing.T, fd, size, flags int) []byte {
	t.Helper()
	m, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, flags)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(m) })
	return m
}

// TestAnonymous reads and writes this process's own anonymous memory as a
// block, the way kvmckpt reads QEMU's default RAM.
func TestAnonymous(t *testing.T) {
	const size = 64 * PageSize
	m := mmap(t, -1, size, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	copy(m[3*PageSize:], "page three")
	copy(m[40*PageSize+100:], "page forty")
	b, err := Locate(os.Getpid(), addr(m), size, true)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.Mapped() != nil || b.File() != nil || !strings.Contains(b.String(), "memory of process") {
		t.Fatalf("anonymous memory opened as %s (mapped %v)", b, b.Mapped() != nil)
	}
	got := make([]byte, 10)
	if _, err := b.ReadAt(got, 3*PageSize); err != nil || string(got) != "page three" {
		t.Fatalf("ReadAt = %q, %v", got, err)
	}
	s, ok := b.Bytes(40*PageSize+100, 10)
	if !ok || string(s) != "page forty" {
		t.Fatalf("Bytes = %q, %v", s, ok)
	}
	if _, err := b.WriteAt([]byte("written"), 40*PageSize+100); err != nil {
		t.Fatal(err)
	}
	if string(m[40*PageSize+100:][:7]) != "written" {
		t.Fatalf("WriteAt did not reach the memory: %q", m[40*PageSize+100:][:10])
	}
	// The mirror forgets what was written through the block.
	if s, _ := b.Bytes(40*PageSize+100, 7); string(s) != "written" {
		t.Fatalf("Bytes after WriteAt = %q", s)
	}
	zeros, err := b.Zeros()
	if err != nil {
		t.Fatal(err)
	}
	want := []pagemap.PageRange{{Start: 0, Count: 3}, {Start: 4, Count: 36}, {Start: 41, Count: 23}}
	if len(zeros) != len(want) {
		t.Fatalf("Zeros = %v, want %v", zeros, want)
	}
	for i := range want {
		if zeros[i] != want[i] {
			t.Fatalf("Zeros = %v, want %v", zeros, want)
		}
	}
	if _, err := b.ReadAt(got, size-5); !errors.Is(err, ErrLayout) {
		t.Fatalf("read past the end: %v", err)
	}
	if _, ok := b.Bytes(size-5, 10); ok {
		t.Fatal("Bytes past the end succeeded")
	}
}

// TestMemfd opens a shared memfd mapping through /proc/PID/fd and maps it,
// as for memory-backend-memfd.
func TestMemfd(t *testing.T) {
	const size = 32 * PageSize
	fd, err := unix.MemfdCreate("memory-backend-memfd", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, 2*size); err != nil {
		t.Fatal(err)
	}
	// The block is the second half of the file, as with a backend at an
	// offset.
	all := mmap(t, fd, 2*size, unix.MAP_SHARED)
	m := all[size:]
	copy(m[5*PageSize:], "memfd data")
	b, err := Locate(os.Getpid(), addr(m), size, true)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.Mapped() == nil || b.File() == nil || !strings.Contains(b.String(), "memfd:memory-backend-memfd") {
		t.Fatalf("memfd opened as %s", b)
	}
	if !bytes.Equal(b.Mapped()[5*PageSize:][:10], []byte("memfd data")) {
		t.Fatal("the mapping does not show the memfd's data at the block's offset")
	}
	if _, err := b.WriteAt([]byte("via block"), 7*PageSize); err != nil || string(m[7*PageSize:][:9]) != "via block" {
		t.Fatalf("write through the block: %v", err)
	}
	zeros, err := b.Zeros()
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, z := range zeros {
		n += z.Count
	}
	if n != 30 {
		t.Fatalf("Zeros = %v (%d pages), want all but pages 5 and 7", zeros, n)
	}
}

// TestPrivateFile reads a file mapped private from the process: its
// pages are the process's copies, not the file's.
func TestPrivateFile(t *testing.T) {
	const size = 8 * PageSize
	f, err := os.CreateTemp(t.TempDir(), "ram")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	m := mmap(t, int(f.Fd()), size, unix.MAP_PRIVATE)
	copy(m, "private copy")
	b, err := Locate(os.Getpid(), addr(m), size, false)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	got := make([]byte, 12)
	if _, err := b.ReadAt(got, 0); err != nil || string(got) != "private copy" {
		t.Fatalf("ReadAt = %q, %v", got, err)
	}
	if z, err := b.Zeros(); err != nil || len(z) != 0 {
		t.Fatalf("Zeros of a private file mapping = %v, %v; untouched pages read from the file, not as zero", z, err)
	}
}

func TestLocateRefuses(t *testing.T) {
	m := mmap(t, -1, 4*PageSize, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	// A gap: unmap the middle.
	if _, _, e := unix.Syscall(unix.SYS_MUNMAP, uintptr(unsafe.Pointer(&m[PageSize])), PageSize, 0); e != 0 {
		t.Fatal(e)
	}
	if _, err := Locate(os.Getpid(), addr(m), 4*PageSize, false); !errors.Is(err, ErrLayout) {
		t.Fatalf("a block with a hole in its mapping: %v", err)
	}
	if _, err := Locate(os.Getpid(), addr(m)+1, PageSize, false); !errors.Is(err, ErrLayout) {
		t.Fatalf("an unaligned block: %v", err)
	}
	// Shared and private mixed.
	fd, err := unix.MemfdCreate("x", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	unix.Ftruncate(fd, 4*PageSize)
	r := mmap(t, -1, 4*PageSize, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if _, _, e := unix.Syscall6(unix.SYS_MMAP, uintptr(unsafe.Pointer(&r[2*PageSize])), 2*PageSize,
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_FIXED, uintptr(fd), 0); e != 0 {
		t.Fatal(e)
	}
	if _, err := Locate(os.Getpid(), addr(r), 4*PageSize, false); !errors.Is(err, ErrLayout) {
		t.Fatalf("shared and private mixed: %v", err)
	}
	if _, err := OpenProcess(1<<30, 1<<20, PageSize, true); err == nil {
		t.Fatal("a process that does not exist opened")
	}
}

func FuzzParseMaps(f *testing.F) {
	f.Add("7f0000000000-7f0080000000 rw-p 00000000 00:00 0 \n")
	f.Add("7f0000000000-7f0080000000 rw-s 00001000 00:01 1234 /memfd:memory-backend-memfd (deleted)\n")
	f.Add("55d1a0000000-55d1a0001000 r--p 00000000 fd:01 42 /usr/bin/qemu-system-x86_64\n")
	f.Fuzz(func(t *testing.T, s string) {
		maps, err := parseMaps(strings.NewReader(s))
		if err != nil {
			return
		}
		for _, v := range maps {
			if v.end <= v.start {
				t.Fatalf("empty mapping %+v accepted", v)
			}
		}
		_, _ = cover(maps, 0x7f0000000000, 1<<20)
	})
}
