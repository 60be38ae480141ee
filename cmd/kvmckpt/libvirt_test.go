package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/kvmckpt/kvmckpt/internal/vmtest"
)

// TestLibvirtDomain is the libvirt acceptance, against a real libvirt
// daemon from Debian's packages and a TCG domain with libvirt's default
// RAM (an anonymous memory-backend-ram, read from QEMU's process): save
// from the domain through libvirt; virsh save of the same guest for
// comparison; export as a libvirt save image at most 0.3x its size;
// virsh restore of the export; then kvmckpt restore --domain. The guest
// verifies its data after each restore.
func TestLibvirtDomain(t *testing.T) {
	// Free memory the guest filled and freed, as a guest that has run a
	// while has: virsh save writes it, kvmckpt leaves it out.
	d := vmtest.BootDomain(t, vmtest.Config{MemMiB: 1024,
		Workload: vmtest.Workload{Churn: 820, Anon: 64, Tmpfs: 32, Text: 32, Interval: 1}})
	d.WaitReady(t)
	// Recorded once the test's environment is put back: isolateProfiles
	// points the cache and the kernel elsewhere, and the record names
	// the kernel by the package the shared cache says it is.
	t.Cleanup(func() {
		if !t.Failed() {
			vmtest.RecordMatrix(d.Config, "libvirt domain: save, export, virsh restore, restore --domain")
		}
	})
	dir := t.TempDir()
	isolateProfiles(t, dir)
	ctx := context.Background()
	capsBefore := monitorJSON(t, d.Name, "query-migrate-capabilities")
	paramsBefore := monitorJSON(t, d.Name, "query-migrate-parameters")

	out := filepath.Join(dir, "vm.kvmckpt")
	code, stdout, stderr := cli(t, "save", "--domain", d.Name, "-o", out, "--json")
	require.Equal(t, exitOK, code, stderr)
	var save map[string]any
	require.NoError(t, json.Unmarshal([]byte(stdout), &save))
	t.Logf("save: pages %v of %v, pause %v ms", save["pages_saved"], save["pages_total"], save["pause_ms"])
	assert.Equal(t, "running", save["guest_state"])
	assert.Equal(t, "running", d.State(t))
	assert.Equal(t, false, save["full_save"])
	// Nothing kvmckpt set stays set.
	assert.Equal(t, capsBefore, monitorJSON(t, d.Name, "query-migrate-capabilities"))
	assert.Equal(t, paramsBefore, monitorJSON(t, d.Name, "query-migrate-parameters"))
	_, _, err := d.WaitSerial(ctx, regexp.MustCompile(`KW VERIFY OK`), len(d.Serial()), time.Minute)
	require.NoError(t, err, "the domain runs on and verifies after the save")
	code, stdout, _ = cli(t, "inspect", out, "--json")
	require.Equal(t, exitOK, code)
	assert.Contains(t, stdout, `"libvirt_domain": "`+d.Name+`"`)

	// virsh save of the same guest: it stops the domain (transient: gone).
	virshImage := filepath.Join(d.Dir, "virsh.save")
	vmtest.Virsh(t, "save", d.Name, virshImage)
	image := filepath.Join(d.Dir, "vm.libvirt")
	code, stdout, stderr = cli(t, "export", out, "--format", "libvirt", "-o", image, "--json")
	require.Equal(t, exitOK, code, stderr)
	ours, theirs := fileSize(t, image), fileSize(t, virshImage)
	t.Logf("libvirt save image: kvmckpt export %d bytes, virsh save %d bytes: %.2fx", ours, theirs, float64(ours)/float64(theirs))
	assert.LessOrEqual(t, float64(ours), 0.3*float64(theirs), "export of %d bytes, virsh save %d", ours, theirs)

	from := len(d.Serial())
	vmtest.Virsh(t, "restore", image)
	assert.Equal(t, "running", d.State(t))
	verifiedAfter(t, d, from)

	// kvmckpt restore --domain: refused while the domain runs, then
	// into the stopped domain.
	code, _, stderr = cli(t, "restore", "-i", out, "--domain", d.Name, "--resume")
	assert.Equal(t, exitBusy, code)
	assert.Contains(t, stderr, "virsh destroy")
	d.Destroy()
	from = len(d.Serial())
	code, stdout, stderr = cli(t, "restore", "-i", out, "--domain", d.Name, "--resume")
	require.Equal(t, exitOK, code, stderr)
	t.Logf("restore --domain: %s", strings.TrimSpace(stdout))
	assert.Equal(t, "running", d.State(t))
	verifiedAfter(t, d, from)
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	for _, e := range entries {
		assert.False(t, strings.HasPrefix(e.Name(), ".kvmckpt-restore-"), "temporary image %s left behind", e.Name())
	}
}

// verifiedAfter waits for two rounds of the workload's verification in
// the serial log after offset from (the log is appended to by each QEMU
// of the domain).
func verifiedAfter(t *testing.T, d *vmtest.Domain, from int) {
	t.Helper()
	if n := len(d.Serial()); n < from {
		from = 0 // truncated
	}
	_, _, err := d.WaitSerial(context.Background(), regexp.MustCompile(`KW VERIFY OK round=\d+[\s\S]*KW VERIFY OK`), from, 2*time.Minute)
	require.NoError(t, err, "restored domain does not verify its data")
	assert.NotRegexp(t, regexp.MustCompile(`(?i)BUG:|Oops|bad page|corrupt|Kernel panic|VERIFY FAIL`), d.Serial()[from:])
}

// monitorJSON runs a QMP command through libvirt and returns its result.
func monitorJSON(t *testing.T, domain, cmd string) string {
	t.Helper()
	out := vmtest.Virsh(t, "qemu-monitor-command", domain, `{"execute":"`+cmd+`"}`)
	var reply struct {
		Return json.RawMessage `json:"return"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &reply), out)
	return string(reply.Return)
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	require.NoError(t, err)
	return st.Size()
}
