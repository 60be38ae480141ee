package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/writer"
)

// craftedCheckpoint writes a valid checkpoint of a 1 MiB guest whose
// recorded strings carry terminal control sequences, as a hostile file
// would.
func craftedCheckpoint(t *testing.T, dir string, cmdline []string, banner string) string {
	t.Helper()
	path := filepath.Join(dir, "crafted.kvmckpt")
	const size = 1 << 20
	h := writer.Header{
		Regions:      []writer.Region{{ID: "mem0", Size: size, MemPath: "/dev/shm/x\x1b[2J.ram", Mappings: []writer.Mapping{{GPA: 0, Offset: 0, Size: size}}}},
		KernelBanner: banner,
		QEMUVersion:  "7.2.0\r",
		MachineType:  "pc",
		CommandLine:  cmdline,
	}
	w, err := writer.Create(path, h, writer.Options{})
	require.NoError(t, err)
	ram := [][]byte{bytes.Repeat([]byte{1}, size)}
	used := pagemap.NewBitmap(size / 4096)
	used.Set(0)
	require.NoError(t, w.WritePages(ram, used, nil))
	_, err = w.WriteDeviceState(strings.NewReader("QEVM device state"))
	require.NoError(t, err)
	require.NoError(t, w.Commit())
	return path
}

// runBinary runs the built kvmckpt, as an operator's terminal would see it.
func runBinary(t *testing.T, timeout time.Duration, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(timeout):
		cmd.Process.Kill()
		<-done
		t.Fatalf("kvmckpt %v did not end within %v", args, timeout)
	}
	return cmd.ProcessState.ExitCode(), o.String(), e.String()
}

// noControl fails if s holds a byte a terminal acts on, other than the
// newlines that end lines.
func noControl(t *testing.T, what, s string) {
	t.Helper()
	for i, c := range []byte(s) {
		if c < 0x20 && c != '\n' || c == 0x7f {
			t.Fatalf("%s holds control byte %#x at %d: %q", what, c, i, s)
		}
	}
}

// TestInspectEscapesCheckpointText: a checkpoint's recorded command line
// held ESC and CR that made `inspect` print a fake "restore into:" line
// hiding an added option. Everything from the file is escaped on the
// terminal, the command line is quoted so that pasting it gives back the
// exact words, and --json stays exact.
func TestInspectEscapesCheckpointText(t *testing.T) {
	dir := t.TempDir()
	evil := "-name\rrestore into: qemu-system-x86_64 -m 1G\x1b[K"
	cmdline := []string{"qemu-system-x86_64", "-m", "1M", evil, "-snapshot"}
	banner := "Linux version 6.1.0\x1b]0;pwned\x07 (x)"
	path := craftedCheckpoint(t, dir, cmdline, banner)

	code, stdout, stderr := runBinary(t, 30*time.Second, "inspect", path)
	require.Equal(t, exitOK, code, stderr)
	noControl(t, "inspect output", stdout)
	assert.Contains(t, stdout, `\x1b]0;pwned\x07`, "the banner's escape shows as text")
	assert.Contains(t, stdout, `$'-name\x0drestore into: qemu-system-x86_64 -m 1G\x1b[K'`, "the word is quoted as one $'...' word")
	lines := 0
	for _, l := range strings.Split(stdout, "\n") {
		if strings.HasPrefix(l, "restore into:") {
			lines++
		}
	}
	assert.Equal(t, 1, lines, "one restore line, the real one (the other is inside a quoted word)")

	code, stdout, stderr = runBinary(t, 30*time.Second, "inspect", "--json", path)
	require.Equal(t, exitOK, code, stderr)
	noControl(t, "inspect --json output", stdout)
	var info struct {
		KernelBanner string   `json:"kernel_banner"`
		CommandLine  []string `json:"command_line"`
	}
	require.NoError(t, json.Unmarshal([]byte(stdout), &info))
	assert.Equal(t, banner, info.KernelBanner, "--json is exact")
	assert.Equal(t, cmdline, info.CommandLine, "--json is exact")
}

// TestFIFOInputs: a FIFO given as the checkpoint or the key file used to
// block kvmckpt for ever, deaf to signals. Every input is opened without
// blocking and must be a regular file.
func TestFIFOInputs(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	require.NoError(t, unix.Mkfifo(fifo, 0o600))
	good := craftedCheckpoint(t, dir, nil, "Linux version 6.1.0")
	for _, args := range [][]string{
		{"inspect", fifo},
		{"verify", fifo},
		{"restore", "-i", fifo, "--qmp", filepath.Join(dir, "none.sock")},
		{"inspect", good, "--encrypt-key", fifo},
		{"profile", "build", "--kernel", fifo},
		{"profile", "show", fifo},
	} {
		t.Run(strings.Join(args[:1], " "), func(t *testing.T) {
			code, _, stderr := runBinary(t, 10*time.Second, args...)
			assert.NotEqual(t, exitOK, code)
			assert.Contains(t, stderr, "not a regular file")
			assert.Contains(t, stderr, "FIFO")
		})
	}
}

// TestOutputsReplaceLinks: `profile build -o` wrote through a symbolic
// link at the output path. Outputs are written beside it and renamed over
// it, so the link is replaced and its target untouched.
func TestOutputsReplaceLinks(t *testing.T) {
	isf, err := filepath.Glob("../../testdata/profiles/isf-*.json.xz")
	require.NoError(t, err)
	require.NotEmpty(t, isf)
	dir := t.TempDir()
	victim := filepath.Join(dir, "victim")
	require.NoError(t, os.WriteFile(victim, []byte("precious"), 0o600))
	out := filepath.Join(dir, "profile.json")
	require.NoError(t, os.Symlink(victim, out))
	code, _, stderr := cli(t, "profile", "build", "--isf", isf[0], "-o", out)
	require.Equal(t, exitOK, code, stderr)
	b, err := os.ReadFile(victim)
	require.NoError(t, err)
	assert.Equal(t, "precious", string(b), "the link's target is untouched")
	st, err := os.Lstat(out)
	require.NoError(t, err)
	assert.True(t, st.Mode().IsRegular(), "the link was replaced by the profile")
}
