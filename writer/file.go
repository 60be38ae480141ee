package writer

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// tempInfix separates the target's name from the pid in a temporary
// file's name: ".<base>.kvmckpt-tmp-<pid>-<16 hex digits>".
const tempInfix = ".kvmckpt-tmp-"

// tempRandLen is the number of random bytes in a temporary file's name.
const tempRandLen = 8

func tempPrefix(base string) string { return "." + base + tempInfix }

func tempName(base string) (string, error) {
	var r [tempRandLen]byte
	if _, err := rand.Read(r[:]); err != nil {
		return "", fmt.Errorf("make temporary name: %w", err)
	}
	return tempPrefix(base) + strconv.Itoa(os.Getpid()) + "-" + hex.EncodeToString(r[:]), nil
}

// parseTempName returns the pid in name if name is a temporary file of the
// target named base.
func parseTempName(base, name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, tempPrefix(base))
	if !ok {
		return 0, false
	}
	pidStr, random, ok := strings.Cut(rest, "-")
	if !ok || len(random) != 2*tempRandLen || strings.Trim(random, "0123456789abcdef") != "" {
		return 0, false
	}
	pid, err := strconv.Atoi(pidStr)
	if err != nil || pid <= 0 || strconv.Itoa(pid) != pidStr {
		return 0, false
	}
	return pid, true
}

// targetDir is the directory of a checkpoint, held open so that the
// temporary file, the rename and the directory fsync all act on the same
// directory even if its path is changed meanwhile.
type targetDir struct {
	fd   int
	path string // for messages
	base string // the target's name in the directory
}

func openTargetDir(target string) (*targetDir, error) {
	dir, base := filepath.Split(target)
	if base == "" || base == "." || base == ".." {
		return nil, fmt.Errorf("checkpoint path %q does not name a file", target)
	}
	if dir == "" {
		dir = "."
	}
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	return &targetDir{fd: fd, path: dir, base: base}, nil
}

func (d *targetDir) close() {
	if d.fd >= 0 {
		unix.Close(d.fd)
		d.fd = -1
	}
}

// openReplaced opens the target, if it is a regular file, to hold its
// blocks past a rename over it (see renameOver); nil if there is none or
// it cannot be opened.
func (d *targetDir) openReplaced() *os.File {
	fd, err := unix.Openat(d.fd, d.base, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	var st unix.Stat_t
	if unix.Fstat(fd, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return nil
	}
	return os.NewFile(uintptr(fd), d.join(d.base))
}

func (d *targetDir) join(name string) string { return filepath.Join(d.path, name) }

// checkTarget refuses a target that exists and is not a regular file, so
// that a symlink planted at the target is reported rather than replaced.
func (d *targetDir) checkTarget() error {
	var st unix.Stat_t
	err := unix.Fstatat(d.fd, d.base, &st, unix.AT_SYMLINK_NOFOLLOW)
	switch {
	case errors.Is(err, unix.ENOENT):
		return nil
	case err != nil:
		return &os.PathError{Op: "stat", Path: d.join(d.base), Err: err}
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return fmt.Errorf("checkpoint %s exists and is not a regular file", d.join(d.base))
	}
	return nil
}

// createTemp creates a new temporary file for the target. O_EXCL and
// O_NOFOLLOW make sure it is a new file, not something planted under the
// name; mode 0600 because the file will hold guest memory.
func (d *targetDir) createTemp() (*os.File, string, error) {
	name, err := tempName(d.base)
	if err != nil {
		return nil, "", err
	}
	fd, err := unix.Openat(d.fd, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, "", &os.PathError{Op: "create", Path: d.join(name), Err: err}
	}
	return os.NewFile(uintptr(fd), d.join(name)), name, nil
}

// CleanStale removes the temporary files that writers of the checkpoint at
// path left behind when their process died, and returns their paths.
// A temporary file is recognised by its name, ".<name>.kvmckpt-tmp-<pid>-
// <random>", and removed only if it is a regular file and no process <pid>
// exists. The pid is of the writer's pid namespace: do not share a
// checkpoint directory between namespaces. A reused pid keeps a stale file
// until that process ends.
func CleanStale(path string) ([]string, error) {
	if IsStored(path) {
		return nil, nil // a store's sink leaves nothing behind when aborted
	}
	d, err := openTargetDir(path)
	if err != nil {
		return nil, fmt.Errorf("clean stale checkpoints: %w", err)
	}
	defer d.close()
	entries, err := os.ReadDir(d.path)
	if err != nil {
		return nil, fmt.Errorf("clean stale checkpoints: %w", err)
	}
	var removed []string
	for _, e := range entries {
		pid, ok := parseTempName(d.base, e.Name())
		if !ok || !e.Type().IsRegular() || processAlive(pid) {
			continue
		}
		if err := unix.Unlinkat(d.fd, e.Name(), 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return removed, fmt.Errorf("clean stale checkpoints: %w", &os.PathError{Op: "remove", Path: d.join(e.Name()), Err: err})
		}
		removed = append(removed, d.join(e.Name()))
	}
	return removed, nil
}

// processAlive reports whether a process pid exists. EPERM means it exists
// but belongs to someone else.
func processAlive(pid int) bool {
	err := unix.Kill(pid, 0)
	return err == nil || errors.Is(err, unix.EPERM)
}
