package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// clockTicks is USER_HZ, the unit of the times in /proc/PID/stat. It is 100
// on every Linux architecture Go supports (sysconf(_SC_CLK_TCK); the kernel
// exports USER_HZ=100 to user space whatever its internal HZ).
const clockTicks = 100

// procTimes are the CPU times of a process from /proc/PID/stat: its own
// (utime+stime) and those of its children it has waited for
// (cutime+cstime). QEMU's exec: migration helpers (cat) land in the latter
// once QEMU reaps them.
type procTimes struct {
	Self, Children time.Duration
}

// Total is the process's CPU time with its reaped children's.
func (p procTimes) Total() time.Duration { return p.Self + p.Children }

// readProcTimes reads the CPU times of process pid.
func readProcTimes(pid int) (procTimes, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procTimes{}, fmt.Errorf("read CPU times of pid %d: %w", pid, err)
	}
	defer f.Close()
	t, err := parseProcStat(f)
	if err != nil {
		return procTimes{}, fmt.Errorf("read CPU times of pid %d: %w", pid, err)
	}
	return t, nil
}

// errProcStat means /proc/PID/stat was not in the documented form.
var errProcStat = errors.New("malformed /proc/PID/stat")

// parseProcStat parses /proc/PID/stat (proc(5)). The command name in
// parentheses may hold spaces and parentheses itself, so the fields are
// counted from the last ')': field 3 (state) is the first after it, and
// utime, stime, cutime, cstime are fields 14 to 17.
func parseProcStat(r io.Reader) (procTimes, error) {
	b, err := io.ReadAll(io.LimitReader(r, 64<<10))
	if err != nil {
		return procTimes{}, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procTimes{}, fmt.Errorf("%w: no command name", errProcStat)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 15 {
		return procTimes{}, fmt.Errorf("%w: %d fields after the command name", errProcStat, len(f))
	}
	var ticks [4]uint64
	for k := range ticks {
		n, err := strconv.ParseUint(f[11+k], 10, 64)
		if err != nil {
			return procTimes{}, fmt.Errorf("%w: field %d: %v", errProcStat, 14+k, err)
		}
		ticks[k] = n
	}
	tick := time.Second / clockTicks
	return procTimes{
		Self:     time.Duration(ticks[0]+ticks[1]) * tick,
		Children: time.Duration(ticks[2]+ticks[3]) * tick,
	}, nil
}

// fileSize is what a file takes: its apparent size and what is allocated
// on disk (st_blocks*512), which is smaller for a sparse file.
type fileSize struct {
	Apparent, Allocated int64
}

func (a fileSize) add(b fileSize) fileSize {
	return fileSize{a.Apparent + b.Apparent, a.Allocated + b.Allocated}
}

// sizeOf stats the files and adds up their sizes.
func sizeOf(paths ...string) (fileSize, error) {
	var total fileSize
	for _, p := range paths {
		var st unix.Stat_t
		if err := unix.Stat(p, &st); err != nil {
			return fileSize{}, fmt.Errorf("stat %s: %w", p, err)
		}
		total = total.add(fileSize{Apparent: st.Size, Allocated: st.Blocks * 512})
	}
	return total, nil
}

// evict drops a file's pages from the page cache, so the next read comes
// from the disk, as it would for a restore long after the save. The file
// has been fsynced, so its pages are clean and POSIX_FADV_DONTNEED drops
// them (mm/fadvise.c); nothing else on the machine is affected.
func evict(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("evict %s from the page cache: %w", path, err)
	}
	defer f.Close()
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		return fmt.Errorf("evict %s from the page cache: %w", path, err)
	}
	return nil
}

// procResult is how a child process ran.
type procResult struct {
	Wall time.Duration
	// CPU is user plus system time of the process, with that of the
	// children it waited for (wait4(2)).
	CPU time.Duration
	// MaxRSS is the peak resident set in bytes; it counts pages of files
	// the process mapped and touched, such as a guest RAM file.
	MaxRSS int64
	Stdout []byte
}

// runProc runs a program to its end, at most timeout, and measures it.
// A failure carries the tail of its stderr.
func runProc(ctx context.Context, timeout time.Duration, env []string, argv ...string) (procResult, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	// Die with the bench, so no tool outlives it holding a guest paused.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	// On a timeout or an interrupt, ask first: kvmckpt and the children
	// put the guest back and remove their partial files on SIGTERM.
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	err := cmd.Run()
	res := procResult{Wall: time.Since(start), Stdout: stdout.Bytes()}
	if cmd.ProcessState != nil {
		if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
			res.CPU = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
			res.MaxRSS = ru.Maxrss << 10 // KiB on Linux (getrusage(2))
		}
	}
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			err = fmt.Errorf("%w (timed out after %v)", err, timeout)
		}
		return res, fmt.Errorf("run %s: %w: %s", argv[0], err, tail(stderr.String(), 8))
	}
	return res, nil
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// Disk measurement modes.
const (
	// diskBuffered is dd's way: write(2) through the page cache, then
	// fdatasync. It is what a tool writing a file normally pays.
	diskBuffered = "buffered"
	// diskDirect bypasses the page cache (O_DIRECT) and then fdatasyncs:
	// the device's own durable sequential bandwidth.
	diskDirect = "direct"
)

// diskRun is one measurement of the disk's durable sequential write
// bandwidth.
type diskRun struct {
	// For is the tool whose byte count was written; Rep the repetition.
	For   string `json:"for"`
	Rep   int    `json:"rep"`
	Mode  string `json:"mode"`
	Bytes int64  `json:"bytes"`
	// MS is the whole write; WriteMS the writes, SyncMS the fdatasync.
	MS      float64 `json:"ms"`
	WriteMS float64 `json:"write_ms"`
	SyncMS  float64 `json:"sync_ms"`
}

// MiBps is the bandwidth in MiB/s.
func (d diskRun) MiBps() float64 { return float64(d.Bytes) / (1 << 20) / (d.MS / 1000) }

// diskBandwidth writes n bytes (a multiple of 4 MiB is best) of
// incompressible data sequentially to a new file in dir and fdatasyncs
// it; buffered, the equivalent of
//
//	dd if=RANDOM of=FILE bs=4M count=N/4M conv=fdatasync
//
// with the random data generated before the clock starts (dd reading
// /dev/zero would flatter a compressing filesystem), or with O_DIRECT
// (oflag=direct). The file is removed.
func diskBandwidth(dir string, n int64, mode string) (diskRun, error) {
	const bufSize = 4 << 20
	// O_DIRECT wants aligned memory: an anonymous mapping is page-aligned.
	buf, err := unix.Mmap(-1, 0, bufSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return diskRun{}, fmt.Errorf("measure disk: %w", err)
	}
	defer unix.Munmap(buf)
	if _, err := rand.Read(buf); err != nil {
		return diskRun{}, err
	}
	flags := os.O_WRONLY | os.O_CREATE | os.O_EXCL
	if mode == diskDirect {
		flags |= unix.O_DIRECT
	}
	name := filepath.Join(dir, fmt.Sprintf("disk-limit-%s-%d.bin", mode, time.Now().UnixNano()))
	f, err := os.OpenFile(name, flags, 0o600)
	if err != nil {
		return diskRun{}, fmt.Errorf("measure disk: %w", err)
	}
	defer os.Remove(name)
	defer f.Close()
	start := time.Now()
	for left := n; left > 0; {
		k := min(left, bufSize)
		if mode == diskDirect {
			k = bufSize // O_DIRECT writes whole aligned blocks
		}
		if _, err := f.Write(buf[:k]); err != nil {
			return diskRun{}, fmt.Errorf("measure disk: %w", err)
		}
		left -= k
	}
	written := time.Now()
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return diskRun{}, fmt.Errorf("measure disk: fdatasync: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		return diskRun{}, fmt.Errorf("measure disk: %w", err)
	}
	return diskRun{Mode: mode, Bytes: st.Size(), MS: ms(time.Since(start)), WriteMS: ms(written.Sub(start)), SyncMS: ms(time.Since(written))}, nil
}

// stat summarises repetitions: the median and the spread.
type stat struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	N      int     `json:"n"`
}

// summarize returns the median, minimum and maximum of v (the mean of the
// middle two for an even count). An empty v gives the zero stat.
func summarize(v []float64) stat {
	if len(v) == 0 {
		return stat{}
	}
	s := slices.Clone(v)
	slices.Sort(s)
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return stat{Median: m, Min: s[0], Max: s[len(s)-1], N: len(s)}
}

// ms converts a duration to milliseconds.
func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// mountOf finds the mount holding path in /proc/self/mountinfo: its mount
// point, filesystem type and source device.
func mountOf(path string) (mountInfo, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return mountInfo{}, err
	}
	defer f.Close()
	return parseMountinfo(f, path)
}

type mountInfo struct {
	MountPoint string `json:"mount_point"`
	FSType     string `json:"fs_type"`
	Source     string `json:"source"`
}

// parseMountinfo returns the mount with the longest mount point that
// contains path (proc(5), /proc/PID/mountinfo: field 5 is the mount point;
// after the " - " separator come the type and the source).
func parseMountinfo(r io.Reader, path string) (mountInfo, error) {
	var best mountInfo
	sc := bufio.NewScanner(r)
	for n := 0; sc.Scan() && n < 100000; n++ {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(g) < 2 {
			continue
		}
		mp := unescapeMount(f[4])
		if !within(path, mp) || len(mp) < len(best.MountPoint) {
			continue
		}
		best = mountInfo{MountPoint: mp, FSType: g[0], Source: g[1]}
	}
	if err := sc.Err(); err != nil {
		return mountInfo{}, err
	}
	if best.MountPoint == "" {
		return mountInfo{}, fmt.Errorf("no mount holds %s", path)
	}
	return best, nil
}

// within reports whether path is mp or below it.
func within(path, mp string) bool {
	return mp == "/" || path == mp || strings.HasPrefix(path, strings.TrimSuffix(mp, "/")+"/")
}

// unescapeMount undoes the octal escapes (\040 for a space) of mountinfo.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// load1 returns the host's one-minute load average, or -1.
func load1() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	return parseLoadavg(string(b))
}

// parseLoadavg returns the first field of /proc/loadavg, or -1.
func parseLoadavg(s string) float64 {
	f := strings.Fields(s)
	if len(f) == 0 {
		return -1
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return -1
	}
	return v
}

// syncfs writes out the dirty data of the filesystem holding dir (other
// processes' too), so that an operation measured next does not pay for it.
func syncfs(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
}
