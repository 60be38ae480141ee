// Package safefile opens the files kvmckpt reads and writes so that no path
// an operator (or another user) gets wrong can hang it or redirect a write:
// inputs are opened without blocking and must be regular files; outputs are
// written to a new file beside the target and renamed over it, so a
// symbolic link at the target is replaced, never written through, and no
// partial file is ever seen at the target.
package safefile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// ErrNotRegular means a path names something other than a regular file: a
// FIFO, a device, a socket or a directory.
var ErrNotRegular = errors.New("not a regular file")

// Open opens path for reading. It does not block whatever the path names
// (a FIFO with no writer would block a plain open for ever) and returns an
// error wrapping [ErrNotRegular] unless it is a regular file. A symbolic
// link to a regular file is followed: reading through one changes nothing.
func Open(path string) (*os.File, error) {
	return open(path, unix.O_RDONLY)
}

// OpenNoFollow is [Open] that refuses a symbolic link at path.
func OpenNoFollow(path string) (*os.File, error) {
	return open(path, unix.O_RDONLY|unix.O_NOFOLLOW)
}

// OpenWrite opens an existing regular file for reading and writing, not
// following a symbolic link at path and without blocking.
func OpenWrite(path string) (*os.File, error) {
	return open(path, unix.O_RDWR|unix.O_NOFOLLOW)
}

func open(path string, flags int) (*os.File, error) {
	fd, err := unix.Open(path, flags|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		if errors.Is(err, unix.ELOOP) && flags&unix.O_NOFOLLOW != 0 {
			return nil, &fs.PathError{Op: "open", Path: path, Err: fmt.Errorf("%w (a symbolic link, which kvmckpt does not follow here)", err)}
		}
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		unix.Close(fd)
		return nil, &fs.PathError{Op: "open", Path: path, Err: fmt.Errorf("%w (it is %s)", ErrNotRegular, kind(st.Mode))}
	}
	// Blocking again: reads of a regular file never block anyway, and
	// os.File would otherwise use the poller for it.
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	return os.NewFile(uintptr(fd), path), nil
}

func kind(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFIFO:
		return "a FIFO"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFLNK:
		return "a symbolic link"
	}
	return fmt.Sprintf("of type %#o", mode&unix.S_IFMT)
}

// ReadFile reads a whole regular file of at most limit bytes, opened as
// [Open] does.
func ReadFile(path string, limit int64) ([]byte, error) {
	f, err := Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, &fs.PathError{Op: "read", Path: path, Err: fmt.Errorf("larger than the %d bytes this file may have", limit)}
	}
	return b, nil
}

// WriteFile writes data to path atomically with permissions perm: into a
// new file beside it, synced and renamed over path. A symbolic link at path
// is replaced by the file, not followed.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	return Write(path, perm, func(f io.Writer) error {
		_, err := f.Write(data)
		return err
	})
}

// Write creates path atomically with permissions perm: fill writes the
// content into a new file beside it, which is synced and renamed over
// path. On any error nothing changes at path and the new file is removed.
func Write(path string, perm os.FileMode, fill func(io.Writer) error) error {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	if st, err := os.Lstat(path); err == nil && st.IsDir() {
		return &fs.PathError{Op: "write", Path: path, Err: fmt.Errorf("%w (it is a directory)", ErrNotRegular)}
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	tmp := f.Name()
	ok := false
	defer func() {
		if !ok {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err := f.Chmod(perm); err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	if err := fill(f); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	ok = true
	return nil
}
