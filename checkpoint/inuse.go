package checkpoint

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrInUse means kvmckpt was asked to write into a file that a process
// maps: another QEMU's RAM, or the guest's own.
var ErrInUse = errors.New("file is memory in use")

// fileID is a file's identity: device and inode.
type fileID struct {
	major, minor uint32
	ino          uint64
}

func statID(path string) (fileID, bool) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return fileID{}, false
	}
	return fileID{unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino}, true
}

func fdID(f *os.File) (fileID, bool) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return fileID{}, false
	}
	return fileID{unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino}, true
}

// mapper is a process that maps a file.
type mapper struct {
	PID  int
	Comm string
}

func (m mapper) String() string { return fmt.Sprintf("pid %d (%s)", m.PID, m.Comm) }

// mappersOf returns the processes other than those in skip that map the
// file id, from every /proc/PID/maps this process can read. Processes in
// another pid namespace are not seen.
func mappersOf(id fileID, skip ...int) ([]mapper, error) {
	d, err := os.Open("/proc")
	if err != nil {
		return nil, fmt.Errorf("list processes: %w", err)
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return nil, fmt.Errorf("list processes: %w", err)
	}
	var out []mapper
next:
	for _, n := range names {
		pid, err := strconv.Atoi(n)
		if err != nil {
			continue
		}
		for _, s := range skip {
			if pid == s {
				continue next
			}
		}
		f, err := os.Open("/proc/" + n + "/maps")
		if err != nil {
			continue // exited, or not ours to read
		}
		found := mapsFile(f, id)
		f.Close()
		if found {
			comm, _ := os.ReadFile("/proc/" + n + "/comm")
			out = append(out, mapper{PID: pid, Comm: strings.TrimSpace(string(comm))})
		}
	}
	return out, nil
}

// mapsFile reports whether a /proc/PID/maps listing maps the file id
// ("start-end perms offset MAJ:MIN inode path", proc(5)).
func mapsFile(r io.Reader, id fileID) bool {
	want := fmt.Sprintf("%02x:%02x", id.major, id.minor)
	ino := strconv.FormatUint(id.ino, 10)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 64<<10)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 5 && f[4] == ino && f[4] != "0" && strings.EqualFold(f[3], want) {
			return true
		}
	}
	return false
}

// checkNotMapped refuses to write into path if a process (other than
// those in skip) maps it; the error wraps [ErrInUse] and ends in fix. A
// missing path is fine.
func checkNotMapped(path, what, fix string, skip ...int) error {
	id, ok := statID(path)
	if !ok {
		return nil
	}
	m, err := mappersOf(id, skip...)
	if err != nil {
		return err
	}
	if len(m) > 0 {
		return inUse(what, path, m[0], fix)
	}
	return nil
}

func inUse(what, path string, m mapper, fix string) error {
	return fmt.Errorf("%w: %s %s is mapped by %s: it is memory a running process (a QEMU's guest RAM?) uses, and writing it would corrupt that guest; %s",
		ErrInUse, what, path, m, fix)
}
