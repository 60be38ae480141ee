//go:build unix

package introspect

import (
	"fmt"
	"math"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/internal/safefile"
)

// MapFile maps the first size bytes of the guest RAM file at path read-only
// and shared (PROT_READ, MAP_SHARED), so that reads see the pages the guest
// wrote without copying them. It returns the mapping and a function that
// unmaps it; the function is safe to call more than once, and the slice must
// not be used after it.
//
// size must be positive and no larger than the file, or the error wraps
// [ErrFileSize]: touching a mapped page wholly beyond end of file raises
// SIGBUS. The same happens if the file is truncated while mapped, which is
// outside kvmckpt's control; a caller that cannot rule it out should read
// under [runtime/debug.SetPanicOnFault].
//
// On tmpfs, touching a page that is a hole in the file allocates it (see
// package pagemap's Holes); callers should skip holes rather than read them.
func MapFile(path string, size int64) (data []byte, unmap func() error, err error) {
	f, err := safefile.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("map guest RAM: %w", err)
	}
	// The mapping keeps its own reference to the file.
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, nil, fmt.Errorf("map guest RAM: %w", err)
	}
	if size <= 0 || size > fi.Size() || uint64(size) > math.MaxInt {
		return nil, nil, fmt.Errorf("map guest RAM %s: size %#x, file size %#x: %w",
			path, size, fi.Size(), ErrFileSize)
	}
	data, err = unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, nil, fmt.Errorf("map guest RAM %s: %w", path, err)
	}
	var once sync.Once
	unmap = func() error {
		var err error
		once.Do(func() {
			if e := unix.Munmap(data); e != nil {
				err = fmt.Errorf("unmap guest RAM %s: %w", path, e)
			}
		})
		return err
	}
	return data, unmap, nil
}
