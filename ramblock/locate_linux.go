package ramblock

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// vma is a line of /proc/PID/maps.
type vma struct {
	start, end   uint64
	shared       bool
	offset       uint64
	major, minor uint32
	inode        uint64
	path         string
}

// maxMapsLines bounds the lines of a maps file read: QEMU has a few
// thousand mappings at most.
const maxMapsLines = 1 << 20

// parseMaps reads /proc/PID/maps (proc(5)).
func parseMaps(r io.Reader) ([]vma, error) {
	var out []vma
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 64<<10)
	for sc.Scan() {
		if len(out) == maxMapsLines {
			return nil, fmt.Errorf("more than %d mappings", maxMapsLines)
		}
		line := sc.Text()
		f := strings.Fields(line)
		if len(f) < 5 {
			return nil, fmt.Errorf("maps line %q", line)
		}
		var v vma
		lo, hi, ok := strings.Cut(f[0], "-")
		var err1, err2, err3, err4, err5 error
		v.start, err1 = strconv.ParseUint(lo, 16, 64)
		v.end, err2 = strconv.ParseUint(hi, 16, 64)
		if !ok || len(f[1]) != 4 {
			return nil, fmt.Errorf("maps line %q", line)
		}
		v.shared = f[1][3] == 's'
		v.offset, err3 = strconv.ParseUint(f[2], 16, 64)
		maj, min, ok2 := strings.Cut(f[3], ":")
		var m1, m2 uint64
		m1, err4 = strconv.ParseUint(maj, 16, 32)
		m2, err5 = strconv.ParseUint(min, 16, 32)
		v.major, v.minor = uint32(m1), uint32(m2)
		inode, err6 := strconv.ParseUint(f[4], 10, 64)
		v.inode = inode
		if err := firstErr(err1, err2, err3, err4, err5, err6); err != nil || !ok2 || v.end <= v.start {
			return nil, fmt.Errorf("maps line %q", line)
		}
		if len(f) > 5 {
			// The path is the rest of the line, spaces included.
			v.path = strings.TrimSpace(line[strings.Index(line, f[5]):])
		}
		out = append(out, v)
	}
	return out, sc.Err()
}

func firstErr(errs ...error) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

// cover returns the mappings that cover [hva, hva+size) without a gap, or
// an error wrapping [ErrLayout].
func cover(maps []vma, hva, size uint64) ([]vma, error) {
	var out []vma
	at, end := hva, hva+size
	for _, v := range maps {
		if v.end <= at || v.start > at {
			continue
		}
		out = append(out, v)
		at = v.end
		if at >= end {
			return out, nil
		}
	}
	return nil, fmt.Errorf("%w: [%#x, %#x) is not wholly mapped (the part from %#x is not)", ErrLayout, hva, end, at)
}

// Locate opens the block of size bytes at address hva of QEMU process
// pid. If the memory there is a file mapped shared (a memfd, a file on
// tmpfs or hugetlbfs) throughout, the file is opened through
// /proc/PID/fd and mapped; otherwise (anonymous memory, a file mapped
// private) the process's memory is read and written in place. Mappings
// of mixed kinds, or a gap, give an error wrapping [ErrLayout]. writable
// opens a file for writing too (a restore).
func Locate(pid int, hva, size uint64, writable bool) (Block, error) {
	if size == 0 || size%PageSize != 0 || hva%PageSize != 0 || hva+size < hva {
		return nil, fmt.Errorf("%w: %d bytes at %#x", ErrLayout, size, hva)
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return nil, fmt.Errorf("read QEMU's mappings: %w", err)
	}
	maps, err := parseMaps(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("read QEMU's mappings: %w", err)
	}
	vs, err := cover(maps, hva, size)
	if err != nil {
		return nil, err
	}
	first := vs[0]
	fileOff := first.offset + (hva - first.start)
	shared, anon := true, true
	for _, v := range vs {
		shared = shared && v.shared && v.inode != 0
		anon = anon && !v.shared && v.inode == 0
		if shared && (v.inode != first.inode || v.major != first.major || v.minor != first.minor ||
			v.offset != first.offset+(v.start-first.start)) {
			return nil, fmt.Errorf("%w: [%#x, %#x) maps more than one file, or one file out of order", ErrLayout, hva, hva+size)
		}
	}
	switch {
	case shared:
		ff, err := openMapped(pid, first, writable)
		if err != nil {
			return nil, err
		}
		return OpenFile(ff, int64(fileOff), size, writable, fmt.Sprintf("%s of process %d", first.path, pid))
	case anon:
		return OpenProcess(pid, hva, size, true)
	default:
		// Private file mappings, or anonymous and shared pieces mixed:
		// the process's view is the guest's.
		for _, v := range vs {
			if v.shared {
				return nil, fmt.Errorf("%w: [%#x, %#x) is partly shared, partly private", ErrLayout, hva, hva+size)
			}
		}
		return OpenProcess(pid, hva, size, false)
	}
}

// openMapped opens the file of mapping v through the process's open file
// descriptors: QEMU keeps a backend's file open (a memfd has no other
// name).
func openMapped(pid int, v vma, writable bool) (*os.File, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("find the file of %s in QEMU: %w", v.path, err)
	}
	flag := os.O_RDONLY
	if writable {
		flag = os.O_RDWR
	}
	for _, e := range ents {
		p := dir + "/" + e.Name()
		var st unix.Stat_t
		if unix.Stat(p, &st) != nil || st.Ino != v.inode ||
			unix.Major(st.Dev) != v.major || unix.Minor(st.Dev) != v.minor || st.Mode&unix.S_IFMT != unix.S_IFREG {
			continue
		}
		f, err := os.OpenFile(p, flag|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if err != nil {
			return nil, fmt.Errorf("open %s (%s of QEMU): %w", p, v.path, err)
		}
		// The descriptor may have been closed and its number reused
		// between the stat and the open.
		if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Ino != v.inode {
			f.Close()
			continue
		}
		return f, nil
	}
	return nil, fmt.Errorf("%w: QEMU holds no open file for %s (inode %d)", ErrLayout, v.path, v.inode)
}
