package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// The test bed's disk (vmtest.MakeDisk): an ext4 file system on /dev/vda
// with data files and SUMS, a line "SHA256HEX NAME" for each.
const (
	diskDev   = "/dev/vda"
	diskMount = "/mnt/disk"
)

// diskFile is a file of the disk and its expected digest.
type diskFile struct {
	name string
	sum  string
}

// readFiles mounts the disk read-only and reads about mibs MiB of its
// files (whole files, in SUMS order) into the page cache, checking each.
func readFiles(mibs int) ([]diskFile, error) {
	if err := os.MkdirAll(diskMount, 0o755); err != nil {
		return nil, err
	}
	if err := syscall.Mount(diskDev, diskMount, "ext4", syscall.MS_RDONLY, ""); err != nil {
		return nil, fmt.Errorf("mount %s: %w", diskDev, err)
	}
	f, err := os.Open(filepath.Join(diskMount, "SUMS"))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var files []diskFile
	var read int64
	sc := bufio.NewScanner(f)
	for sc.Scan() && read < int64(mibs)*mib {
		sum, name, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			return nil, fmt.Errorf("SUMS line %q", sc.Text())
		}
		df := diskFile{name: name, sum: sum}
		n, err := df.check()
		if err != nil {
			return nil, err
		}
		read += n
		files = append(files, df)
	}
	return files, sc.Err()
}

// check reads the file and compares its digest; it returns its size.
func (d diskFile) check() (int64, error) {
	f, err := os.Open(filepath.Join(diskMount, d.name))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return n, fmt.Errorf("read %s: %w", d.name, err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != d.sum {
		return n, fmt.Errorf("%s: sha256 %s, want %s", d.name, got, d.sum)
	}
	return n, nil
}

// verifyFiles reads the files again and again (from the page cache, or
// from the disk once the cache is gone), saying after each pass whether
// every file still has its digest.
func verifyFiles(say func(string, ...any), files []diskFile, interval time.Duration) {
	for pass := 1; ; pass++ {
		time.Sleep(interval)
		start := time.Now()
		var total int64
		bad := ""
		for _, d := range files {
			n, err := d.check()
			total += n
			if err != nil && bad == "" {
				bad = err.Error()
			}
		}
		if bad != "" {
			say("FILES FAIL pass=%d %s", pass, bad)
		} else {
			say("FILES OK pass=%d mib=%d ms=%d", pass, total/mib, time.Since(start).Milliseconds())
		}
	}
}

// reportMeminfo prints what /proc/meminfo says of memory the guest cannot
// give back without swap (anonymous, shmem and tmpfs, the kernel's own)
// beside its page cache, in KiB.
func reportMeminfo(say func(string, ...any)) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		say("ERROR meminfo: %v", err)
		return
	}
	v := map[string]uint64{}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 {
			var n uint64
			fmt.Sscan(f[1], &n)
			v[strings.TrimSuffix(f[0], ":")] = n
		}
	}
	say("MEMINFO anon_kb=%d shmem_kb=%d cached_kb=%d sunreclaim_kb=%d kernelstack_kb=%d pagetables_kb=%d free_kb=%d dirty_kb=%d",
		v["AnonPages"], v["Shmem"], v["Cached"], v["SUnreclaim"], v["KernelStack"], v["PageTables"], v["MemFree"], v["Dirty"])
}

// The test bed's scratch disk (Config.ScratchMiB): an empty ext4 file
// system, mounted read-write; the test bed attaches it after the data
// disk, so it is /dev/vdb beside one and /dev/vda alone.
const scratchMount = "/mnt/scratch"

func scratchDev() string {
	if _, err := os.Stat("/dev/vdb"); err == nil {
		return "/dev/vdb"
	}
	return "/dev/vda"
}

// keepDirty writes mibs MiB of data to a file on the scratch disk and
// keeps it dirty in the page cache: writeback is put off (dirty pages
// expire after an hour, background writeback starts at 90% of memory).
// It returns the data, to check the file against.
func keepDirty(mibs int, seed uint64) ([]byte, error) {
	for path, v := range map[string]string{
		"/proc/sys/vm/dirty_expire_centisecs":    "360000",
		"/proc/sys/vm/dirty_writeback_centisecs": "0",
		"/proc/sys/vm/dirty_background_ratio":    "90",
		"/proc/sys/vm/dirty_ratio":               "90",
	} {
		if err := os.WriteFile(path, []byte(v), 0); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(scratchMount, 0o755); err != nil {
		return nil, err
	}
	if err := syscall.Mount(scratchDev(), scratchMount, "ext4", 0, ""); err != nil {
		return nil, fmt.Errorf("mount %s: %w", scratchDev(), err)
	}
	data := make([]byte, mibs*mib)
	fillRandom(data, seed^0xd1e7)
	if err := os.WriteFile(filepath.Join(scratchMount, "dirty.bin"), data, 0o644); err != nil {
		return nil, err
	}
	return data, nil
}

// checkDirty reads the dirty file back and compares it with data.
func checkDirty(data []byte) error {
	got, err := os.ReadFile(filepath.Join(scratchMount, "dirty.bin"))
	if err != nil {
		return err
	}
	if !bytes.Equal(got, data) {
		return fmt.Errorf("dirty.bin differs from what was written")
	}
	return nil
}
