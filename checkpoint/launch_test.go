package checkpoint

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/qmp"
	"github.com/kvmckpt/kvmckpt/writer"
)

func TestLaunchArgs(t *testing.T) {
	src := []string{"qemu-system-x86_64", "-machine", "pc,accel=tcg,memory-backend=mem0", "-no-reboot",
		"-object", "memory-backend-file,id=mem0,size=1G,mem-path=/dev/shm/src.ram,share=on",
		"-nodefaults", "-serial", "file:/tmp/serial.log", "-qmp", "unix:/tmp/src.qmp,server=on,wait=off",
		"-incoming", "tcp:0:4444", "-S", "-append", "console=ttyS0 -S"}
	got, files, err := launchArgs(src, "/dev/shm/new", "/dev/shm/new.qmp")
	require.NoError(t, err)
	assert.Equal(t, []string{"/dev/shm/new.ram"}, files)
	assert.Equal(t, []string{"qemu-system-x86_64", "-machine", "pc,accel=tcg,memory-backend=mem0", "-no-reboot",
		"-object", "memory-backend-file,id=mem0,size=1G,mem-path=/dev/shm/new.ram,share=on",
		"-nodefaults", "-serial", "file:/dev/shm/new-1-serial.log",
		"-append", "console=ttyS0 -S", "-incoming", "defer", "-S",
		"-qmp", "unix:/dev/shm/new.qmp,server=on,wait=off"}, got)

	// libvirt's style of monitor: a chardev socket and -mon. The copy
	// must not listen on the source's path (QEMU would replace the
	// source's socket there); nor share any other socket, file or pid
	// file.
	libvirtStyle := []string{"qemu-system-x86_64", "-object", "memory-backend-file,id=mem0,size=1G,mem-path=/dev/shm/src.ram,share=on",
		"-chardev", "socket,id=charmonitor,path=/run/vm/monitor.sock,server=on,wait=off", "-mon", "chardev=charmonitor,id=monitor,mode=control",
		"-chardev", "file,id=log0,path=/var/log/vm.log", "-monitor", "unix:/run/vm/hmp.sock,server,nowait",
		"-serial", "pipe:/run/vm/serial", "-pidfile", "/run/vm/qemu.pid", "-D", "/var/log/qemu-debug.log",
		"-vnc", "unix:/run/vm/vnc.sock", "-chardev", "socket,id=tcp0,host=127.0.0.1,port=4555,server=on,wait=off"}
	got, _, moved, err := launchPaths(libvirtStyle, "/dev/shm/new", "/dev/shm/new.qmp")
	require.NoError(t, err)
	joined := strings.Join(got, " ")
	for _, old := range []string{"/run/vm/monitor.sock", "/var/log/vm.log", "/run/vm/hmp.sock", "/run/vm/serial", "/run/vm/qemu.pid", "/var/log/qemu-debug.log", "/run/vm/vnc.sock", "/dev/shm/src.ram"} {
		assert.NotContains(t, joined, old, "the copy must not use the source's %s", old)
	}
	assert.Len(t, moved, 7)
	for old, p := range moved {
		assert.True(t, strings.HasPrefix(p, "/dev/shm/new-"), "%s moved to %s", old, p)
	}
	assert.Contains(t, got, "chardev=charmonitor,id=monitor,mode=control")
	assert.Contains(t, got, "socket,id=tcp0,host=127.0.0.1,port=4555,server=on,wait=off", "a TCP port is not a path: QEMU refuses it if it is taken")

	_, _, err = launchArgs([]string{"qemu", "-object", "memory-backend-file,id=m,size=1G,mem-path=/a,share=on", "-spice", "unix=on,addr=/run/spice.sock"}, "/r", "/q")
	assert.ErrorIs(t, err, ErrInvalid)

	json := []string{"qemu", "-object", `{"qom-type":"memory-backend-file","id":"m","mem-path":"/x","share":true,"size":1073741824}`}
	got, _, err = launchArgs(json, "/dev/shm/n", "/q")
	require.NoError(t, err)
	assert.Contains(t, got[2], `"mem-path":"/dev/shm/n.ram"`)

	// A NUMA guest: a RAM file per backend.
	numa := []string{"qemu", "-object", "memory-backend-file,id=m0,size=1G,mem-path=/a,share=on", "-numa", "node,memdev=m0",
		"-object", "iothread,id=io0", "-object", "memory-backend-file,id=m1,size=1G,mem-path=/b,share=on", "-numa", "node,memdev=m1"}
	got, files, err = launchArgs(numa, "/r/n", "/q")
	require.NoError(t, err)
	assert.Equal(t, []string{"/r/n.ram", "/r/n-1.ram"}, files)
	assert.Equal(t, "memory-backend-file,id=m0,size=1G,mem-path=/r/n.ram,share=on", got[2])
	assert.Equal(t, "iothread,id=io0", got[6])
	assert.Equal(t, "memory-backend-file,id=m1,size=1G,mem-path=/r/n-1.ram,share=on", got[8])

	// QEMU's own RAM: no file to make; the restore fills it through
	// QEMU's process.
	got, files, err = launchArgs([]string{"qemu", "-m", "1G"}, "/r", "/q")
	require.NoError(t, err)
	assert.Empty(t, files)
	assert.Equal(t, []string{"qemu", "-m", "1G", "-incoming", "defer", "-S", "-qmp", "unix:/q,server=on,wait=off"}, got)
}

func TestPageSpans(t *testing.T) {
	g := &guest{backends: []qmp.Backend{{Size: 8 << 12}, {Size: 4 << 12}}}
	spans, total := g.pageSpans()
	assert.Equal(t, []pageSpan{{0, 8}, {8, 4}}, spans)
	assert.Equal(t, uint64(12), total)
	for _, c := range []struct {
		span         int
		start, count uint64
		off, n       uint64
		ok           bool
	}{
		{0, 6, 4, 6, 2, true},  // runs over the end of the first
		{1, 6, 4, 0, 2, true},  // and into the second
		{1, 0, 8, 0, 0, false}, // wholly in the first
		{1, 11, 5, 3, 1, true}, // past the end of all
	} {
		off, n, ok := spans[c.span].clip(c.start, c.count)
		assert.Equal(t, []any{c.off, c.n, c.ok}, []any{off, n, ok}, "%+v", c)
	}
}

// TestQEMUBinary: a launch runs only a QEMU system emulator, found in PATH
// by the recorded name, never a path from the checkpoint.
func TestQEMUBinary(t *testing.T) {
	want, err := exec.LookPath("qemu-system-x86_64")
	require.NoError(t, err, "run make deps")
	for _, recorded := range []string{"qemu-system-x86_64", "/usr/bin/qemu-system-x86_64", "/tmp/evil/qemu-system-x86_64"} {
		got, err := qemuBinary(recorded)
		require.NoError(t, err, recorded)
		assert.Equal(t, want, got, recorded)
	}
	for _, recorded := range []string{"/bin/sh", "qemu-img", "qemu-system-x86_64 -x", "", "/usr/bin/"} {
		_, err := qemuBinary(recorded)
		assert.ErrorIs(t, err, ErrInvalid, "%q", recorded)
	}
	_, err = qemuBinary("/usr/libexec/qemu-system-nosucharch")
	assert.ErrorContains(t, err, "--qemu")
}

// TestRestoreLaunchRefusesOtherPrograms: a checkpoint whose recorded
// command line runs something other than QEMU is refused before anything
// is started.
func TestRestoreLaunchRefusesOtherPrograms(t *testing.T) {
	dir := t.TempDir()
	marker := filepath.Join(dir, "ran")
	const pages = 16
	h := writer.Header{
		MachineType: "pc-i440fx-7.2",
		CommandLine: []string{"/usr/bin/touch", marker, "-object", "memory-backend-file,id=m,size=64K,mem-path=/x,share=on"},
		Regions: []writer.Region{{ID: "m", Size: pages * writer.PageSize, MemPath: "/x",
			Mappings: []writer.Mapping{{Size: pages * writer.PageSize}}}},
	}
	path := filepath.Join(dir, "evil.kvmckpt")
	w, err := writer.Create(path, h, writer.Options{})
	require.NoError(t, err)
	defer w.Abort()
	require.NoError(t, w.WritePages([][]byte{make([]byte, pages*writer.PageSize)}, pagemap.NewBitmap(pages), nil))
	_, err = w.WriteDeviceState(strings.NewReader("device state"))
	require.NoError(t, err)
	require.NoError(t, w.Commit())

	_, err = RestoreLaunch(context.Background(), LaunchOptions{RestoreOptions: RestoreOptions{Input: path}, RAMDir: dir})
	require.ErrorIs(t, err, ErrInvalid)
	assert.ErrorContains(t, err, "not a QEMU system emulator")
	assert.NoFileExists(t, marker, "the recorded program must not run")
}

// TestLockPathIgnoresTMPDIR: every kvmckpt run by root finds the same lock
// for a guest, whatever its environment, in a directory only root writes.
func TestLockPathIgnoresTMPDIR(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("root's lock directory; other users have their own")
	}
	t.Setenv(RunDirEnv, "")
	sock := filepath.Join(t.TempDir(), "qmp.sock")
	l, err := net.Listen("unix", sock)
	require.NoError(t, err)
	defer l.Close()
	a := LockPath(sock)
	t.Setenv("TMPDIR", t.TempDir())
	assert.Equal(t, a, LockPath(sock))
	assert.Equal(t, "/run/kvmckpt", filepath.Dir(a))
}
