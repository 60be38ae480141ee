package checkpoint

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestLaunchArgs(t *testing.T) {
	src := []string{"qemu-system-x86_64", "-machine", "pc,accel=tcg,memory-backend=mem0", "-no-reboot",
		"-object", "memory-backend-file,id=mem0,size=1G,mem-path=/dev/shm/src.ram,share=on",
		"-nodefaults", "-serial", "file:/tmp/serial.log", "-qmp", "unix:/tmp/src.qmp,server=on,wait=off",
		"-incoming", "tcp:0:4444", "-S", "-append", "console=ttyS0 -S"}
	got, err := launchArgs(src, "/dev/shm/new.ram", "/dev/shm/new.qmp")
	require.NoError(t, err)
	assert.Equal(t, []string{"qemu-system-x86_64", "-machine", "pc,accel=tcg,memory-backend=mem0", "-no-reboot",
		"-object", "memory-backend-file,id=mem0,size=1G,mem-path=/dev/shm/new.ram,share=on",
		"-nodefaults", "-serial", "file:/tmp/serial.log.restored",
		"-append", "console=ttyS0 -S", "-incoming", "defer", "-S",
		"-qmp", "unix:/dev/shm/new.qmp,server=on,wait=off"}, got)

	json := []string{"qemu", "-object", `{"qom-type":"memory-backend-file","id":"m","mem-path":"/x","share":true,"size":1073741824}`}
	got, err = launchArgs(json, "/dev/shm/n.ram", "/q")
	require.NoError(t, err)
	assert.Contains(t, got[2], `"mem-path":"/dev/shm/n.ram"`)

	_, err = launchArgs([]string{"qemu", "-m", "1G"}, "/r", "/q")
	assert.ErrorIs(t, err, ErrRAMBackend)
}
