package checkpoint

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// tmpfsDir mounts a fresh tmpfs of the given size with the given flags
// (root), for tests of full and read-only disks, and unmounts it at the end.
func tmpfsDir(t *testing.T, size string, flags uintptr) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", flags, "size="+size+",mode=0700"); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
	return dir
}

// readOnlyDir is a directory nobody, root included, can create files in.
func readOnlyDir(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		dir := t.TempDir()
		if err := os.Chmod(dir, 0o500); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Chmod(dir, 0o700) })
		return dir
	}
	return tmpfsDir(t, "1m", syscall.MS_RDONLY)
}

// hugetlbfsDir reserves enough 2 MiB huge pages for mib MiB more (root),
// mounts a hugetlbfs for them, and undoes both at the end. It skips the
// test where that cannot be done: not root, a read-only /proc/sys (a
// container), or host memory too fragmented for the pages.
func hugetlbfsDir(t *testing.T, mib int) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("reserving huge pages needs root")
	}
	const knob = "/proc/sys/vm/nr_hugepages"
	b, err := os.ReadFile(knob)
	if err != nil {
		t.Fatal(err)
	}
	orig, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	need := mib / 2
	if err := os.WriteFile(knob, []byte(strconv.Itoa(orig+need)), 0); err != nil {
		t.Skipf("cannot reserve huge pages here: %v", err)
	}
	t.Cleanup(func() { _ = os.WriteFile(knob, []byte(strconv.Itoa(orig)), 0) })
	if free := hugePagesFree(t); free < need {
		t.Skipf("could reserve only %d of %d huge pages", free, need)
	}
	dir := t.TempDir()
	if err := syscall.Mount("none", dir, "hugetlbfs", 0, "pagesize=2M,mode=0700"); err != nil {
		t.Skipf("cannot mount hugetlbfs here: %v", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
	return dir
}

func hugePagesFree(t *testing.T) int {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var n int
		if _, err := fmt.Sscanf(sc.Text(), "HugePages_Free: %d", &n); err == nil {
			return n
		}
	}
	t.Fatal("no HugePages_Free in /proc/meminfo")
	return 0
}
