package checkpoint

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMapsFile(t *testing.T) {
	maps := `55d4c2a00000-55d4c2a2c000 r--p 00000000 fe:01 1835123                    /usr/bin/qemu-system-x86_64
7f0000000000-7f0040000000 rw-s 00000000 00:1a 4242                       /dev/shm/vm0.ram
7f0040000000-7f0040001000 rw-p 00000000 00:00 0
7ffd1c3f0000-7ffd1c411000 rw-p 00000000 00:00 0                          [stack]
`
	for _, c := range []struct {
		name string
		id   fileID
		want bool
	}{
		{"RAM file", fileID{0, 0x1a, 4242}, true},
		{"binary", fileID{0xfe, 1, 1835123}, true},
		{"other inode", fileID{0, 0x1a, 4243}, false},
		{"other device", fileID{0, 0x1b, 4242}, false},
		{"anonymous", fileID{0, 0, 0}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			assert.Equal(t, c.want, mapsFile(strings.NewReader(maps), c.id))
		})
	}
}

// TestCheckNotMapped maps a file in a child process and checks that
// kvmckpt refuses to write into it, and accepts it once unmapped.
func TestCheckNotMapped(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ram")
	require.NoError(t, os.WriteFile(path, make([]byte, 1<<16), 0o600))
	require.NoError(t, checkNotMapped(path, "output", "write the checkpoint elsewhere"))
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	defer f.Close()
	m, err := syscall.Mmap(int(f.Fd()), 0, 1<<16, syscall.PROT_READ, syscall.MAP_SHARED)
	require.NoError(t, err)
	err = checkNotMapped(path, "output", "write the checkpoint elsewhere")
	require.ErrorIs(t, err, ErrInUse)
	assert.ErrorContains(t, err, "write the checkpoint elsewhere")
	require.NoError(t, checkNotMapped(path, "output", "write the checkpoint elsewhere", os.Getpid()), "the pids skipped are not counted")
	require.NoError(t, syscall.Munmap(m))
	require.NoError(t, checkNotMapped(path, "output", "write the checkpoint elsewhere"))
	require.NoError(t, checkNotMapped(filepath.Join(t.TempDir(), "missing"), "output", ""))
}
