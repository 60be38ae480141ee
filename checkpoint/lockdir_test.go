package checkpoint

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// TestRunDirRefusesUnsafe: lock files decide whether a guest is resumed,
// so their directory must be writable by nobody but the user running
// kvmckpt. Each unsafe directory is refused with a fix, and nothing in it
// can stall the lock.
func TestRunDirRefusesUnsafe(t *testing.T) {
	base := t.TempDir()
	mk := func(name string, mode os.FileMode) string {
		d := filepath.Join(base, name)
		require.NoError(t, os.Mkdir(d, 0o700))
		require.NoError(t, os.Chmod(d, mode))
		return d
	}
	open := mk("open", 0o777)
	sticky := mk("sticky", 0o1777)
	group := mk("group", 0o770)
	link := filepath.Join(base, "link")
	require.NoError(t, os.Symlink(mk("target", 0o700), link))
	cases := map[string]string{"world-writable": open, "sticky like /run/lock": sticky, "group-writable": group, "symbolic link": link}
	if os.Geteuid() == 0 {
		other := mk("other", 0o700)
		require.NoError(t, os.Chown(other, 65534, 65534))
		cases["another user's"] = other
	}
	for name, dir := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := lockFile(filepath.Join(dir, "kvmckpt-x.lock"))
			require.ErrorIs(t, err, ErrUnsafePath)
			assert.ErrorContains(t, err, dir)
			assert.NoFileExists(t, filepath.Join(dir, "kvmckpt-x.lock"))
		})
	}

	t.Run("made 0700 when missing", func(t *testing.T) {
		dir := filepath.Join(base, "new")
		f, err := lockFile(filepath.Join(dir, "kvmckpt-x.lock"))
		require.NoError(t, err)
		f.Close()
		st, err := os.Stat(dir)
		require.NoError(t, err)
		assert.Equal(t, os.FileMode(0o700), st.Mode().Perm())
	})

	t.Run("FIFO at the lock path", func(t *testing.T) {
		dir := mk("fifo", 0o700)
		path := filepath.Join(dir, "kvmckpt-x.lock")
		require.NoError(t, unix.Mkfifo(path, 0o600))
		done := make(chan error, 1)
		go func() { _, err := lockFile(path); done <- err }()
		select {
		case err := <-done:
			require.ErrorIs(t, err, ErrUnsafePath)
		case <-time.After(5 * time.Second):
			t.Fatal("a FIFO at the lock path blocked kvmckpt")
		}
	})

	t.Run("link at the lock path", func(t *testing.T) {
		dir := mk("linkfile", 0o700)
		victim := filepath.Join(base, "victim")
		require.NoError(t, os.WriteFile(victim, []byte("keep"), 0o600))
		path := filepath.Join(dir, "kvmckpt-x.lock")
		require.NoError(t, os.Symlink(victim, path))
		_, err := lockFile(path)
		require.Error(t, err)
		b, _ := os.ReadFile(victim)
		assert.Equal(t, "keep", string(b))
	})
}

// TestLockDirAgainstOtherUsers runs the attacks of an unprivileged local
// user on root's real lock directory: creating a lock file first (to plant
// a pause record, hold a shared flock or put a FIFO there) must fail.
func TestLockDirAgainstOtherUsers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root, to act as another user")
	}
	t.Setenv(RunDirEnv, "")
	dir := RunDir()
	require.NoError(t, ensureRunDir(dir))
	st, err := os.Lstat(dir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), st.Mode().Perm())
	assert.True(t, st.IsDir())

	target := filepath.Join(dir, "kvmckpt-attack-test.lock")
	defer os.Remove(target)
	for name, script := range map[string]string{
		"forged pause record": `printf 'paused a running guest: pid 1 at now; qemu unknown\n' > "$1"`,
		"shared flock":        `exec 9>>"$1" && flock -s -n 9`,
		"FIFO":                `mkfifo "$1"`,
		"symbolic link":       `ln -s /etc/passwd "$1"`,
	} {
		t.Run(name, func(t *testing.T) {
			cmd := exec.Command("/bin/sh", "-c", script, "sh", target)
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
			out, err := cmd.CombinedOutput()
			var exit *exec.ExitError
			require.True(t, errors.As(err, &exit), "user nobody could %s in %s: %v %s", name, dir, err, out)
			_, err = os.Lstat(target)
			assert.True(t, os.IsNotExist(err), "nothing was created")
		})
	}
}
