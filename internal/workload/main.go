// Command workload runs inside the test guest as its only program, started
// by the initramfs init. It shapes guest memory the way kvmckpt cares about
// and reports on the serial console, where the test bed reads it.
//
// It takes its settings from the kernel command line (all sizes in MiB):
//
//	kw.churn=N      fill N MiB with non-zero data (half in a tmpfs file, half
//	                anonymous) and release it: the guest ends with many free
//	                pages that are not zero
//	kw.anon=N       keep N MiB of incompressible data in anonymous memory
//	kw.tmpfs=N      keep N MiB of incompressible data in a tmpfs file
//	kw.text=N       keep N MiB of compressible data in anonymous memory
//	kw.interval=S   re-verify the kept data every S seconds (default 2)
//	kw.seed=N       seed of the data generator (default 1)
//	kw.truth=1      print ground truth for introspection tests, then stay
//	                quiescent: no verification loop, no allocation
//	kw.wset=N       keep writing pages of an N MiB working set (anonymous
//	kw.rate=R       memory) at R MiB/s, in a deterministic sequence with a
//	                generation counter, and check every interval that
//	                replaying the sequence up to the counter gives every
//	                page: a checkpoint taken at one moment passes after a
//	                restore, one torn between moments fails (see pageWriter)
//	kw.files=N      mount the test bed's disk (/dev/vda, ext4, read-only),
//	                read N MiB of its files into the page cache, and keep
//	                checking them against the disk's SUMS ("KW FILES OK")
//	kw.dirty=N      write N MiB to a file of the scratch disk (/dev/vdb,
//	                ext4) and keep it dirty in the page cache (writeback
//	                put off), checked with the kept data ("KW DIRTY OK")
//	kw.spin=1       not the workload's: /coretarget (the core tests'
//	                process, started by init) spins a thread in user mode
//
// Every line it prints starts with "KW ", so the test bed can tell them from
// kernel messages. See internal/vmtest for the parser of this output.
package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

const (
	mib      = 1 << 20
	pageSize = 4096
	// tmpfsDir is mounted by the initramfs init.
	tmpfsDir = "/mnt/data"
)

type config struct {
	churn, anon, tmpfs, text int
	interval                 time.Duration
	seed                     uint64
	truth                    bool
	wset, rate               int
	// files is how many MiB of the test bed's disk to read and keep
	// checking (kw.files); dirty how many MiB to keep dirty in a file
	// of its scratch disk (kw.dirty).
	files, dirty int
}

func main() {
	out := bufio.NewWriter(os.Stdout)
	if err := run(out); err != nil {
		fmt.Fprintf(out, "KW ERROR %v\n", err)
		out.Flush()
	}
	// The workload is the guest's init payload: if it returned, the kernel
	// would panic. Stay alive so the error above can be read.
	idle()
}

// idle sleeps for ever. (An empty select would trip the runtime's deadlock
// detector, which ends the program.)
func idle() {
	for {
		time.Sleep(time.Hour)
	}
}

func run(out *bufio.Writer) error {
	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return err
	}
	cfg, err := parseConfig(string(cmdline))
	if err != nil {
		return err
	}
	say := func(format string, args ...any) {
		fmt.Fprintf(out, "KW "+format+"\n", args...)
		out.Flush()
	}
	say("START churn=%d anon=%d tmpfs=%d text=%d truth=%v", cfg.churn, cfg.anon, cfg.tmpfs, cfg.text, cfg.truth)
	reportMem(say, "boot")
	if cfg.truth {
		// Transparent huge pages come and go behind the workload's back:
		// khugepaged allocates a huge page ahead of a collapse and frees it
		// later. Turn them off so the snapshot stays true.
		for path, v := range map[string]string{
			"/sys/kernel/mm/transparent_hugepage/enabled":           "never",
			"/sys/kernel/mm/transparent_hugepage/khugepaged/defrag": "0",
		} {
			if err := os.WriteFile(path, []byte(v), 0); err != nil {
				say("WARN %v", err)
			}
		}
	}

	if cfg.churn > 0 {
		start := time.Now()
		if err := churn(cfg); err != nil {
			return fmt.Errorf("churn: %w", err)
		}
		say("CHURNED mib=%d ms=%d", cfg.churn, time.Since(start).Milliseconds())
	}

	kept, err := keep(cfg)
	if err != nil {
		return fmt.Errorf("keep: %w", err)
	}
	// Hand back what the Go runtime holds but does not use, so that the
	// scavenger does not free pages later behind the host's back.
	debug.FreeOSMemory()
	reportMem(say, "kept")

	if cfg.truth {
		if err := truth(out, kept); err != nil {
			return fmt.Errorf("truth: %w", err)
		}
		say("READY")
		time.Sleep(laterSnapshotDelay)
		if err := pageSnapshot(out, "2"); err != nil {
			return fmt.Errorf("truth: %w", err)
		}
		say("TRUTH2 END")
		// Quiescent from here on: no output, no collection.
		idle()
	}
	if cfg.files > 0 {
		start := time.Now()
		files, err := readFiles(cfg.files)
		if err != nil {
			return fmt.Errorf("files: %w", err)
		}
		say("FILES READ n=%d ms=%d", len(files), time.Since(start).Milliseconds())
		reportMem(say, "files")
		reportMeminfo(say)
		go verifyFiles(say, files, cfg.interval)
	}
	var dirty []byte
	if cfg.dirty > 0 {
		if dirty, err = keepDirty(cfg.dirty, cfg.seed); err != nil {
			return fmt.Errorf("dirty: %w", err)
		}
		say("DIRTY WRITTEN mib=%d", cfg.dirty)
		reportMeminfo(say)
	}
	if cfg.wset > 0 && cfg.rate > 0 {
		w, err := newPageWriter(cfg)
		if err != nil {
			return fmt.Errorf("page writer: %w", err)
		}
		go w.run(say, cfg.interval)
	}
	say("READY")
	for round := 1; ; round++ {
		time.Sleep(cfg.interval)
		if bad := kept.verify(); bad != "" {
			say("VERIFY FAIL round=%d %s", round, bad)
		} else {
			say("VERIFY OK round=%d mib=%d", round, kept.mib())
		}
		if dirty != nil {
			if err := checkDirty(dirty); err != nil {
				say("DIRTY FAIL round=%d %v", round, err)
			} else {
				say("DIRTY OK round=%d", round)
			}
		}
	}
}

func parseConfig(cmdline string) (config, error) {
	cfg := config{interval: 2 * time.Second, seed: 1}
	for _, f := range strings.Fields(cmdline) {
		k, v, ok := strings.Cut(f, "=")
		if !ok || !strings.HasPrefix(k, "kw.") {
			continue
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return cfg, fmt.Errorf("kernel command line %s: %w", f, err)
		}
		switch k {
		case "kw.churn":
			cfg.churn = int(n)
		case "kw.anon":
			cfg.anon = int(n)
		case "kw.tmpfs":
			cfg.tmpfs = int(n)
		case "kw.text":
			cfg.text = int(n)
		case "kw.interval":
			cfg.interval = time.Duration(n) * time.Second
		case "kw.seed":
			cfg.seed = n
		case "kw.truth":
			cfg.truth = n != 0
		case "kw.wset":
			cfg.wset = int(n)
		case "kw.rate":
			cfg.rate = int(n)
		case "kw.files":
			cfg.files = int(n)
		case "kw.dirty":
			cfg.dirty = int(n)
		case "kw.spin":
			// For /coretarget, which reads it itself.
		default:
			return cfg, fmt.Errorf("kernel command line: unknown setting %s", k)
		}
	}
	return cfg, nil
}

func reportMem(say func(string, ...any), when string) {
	total, free, err := meminfo()
	if err != nil {
		say("ERROR meminfo: %v", err)
		return
	}
	say("MEM when=%s total_kb=%d free_kb=%d", when, total, free)
}

func meminfo() (total, free uint64, err error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		n, _ := strconv.ParseUint(f[1], 10, 64)
		switch f[0] {
		case "MemTotal:":
			total = n
		case "MemFree:":
			free = n
		}
	}
	return total, free, nil
}

// rng is xorshift64*: fast, and its output does not compress.
type rng uint64

func (r *rng) next() uint64 {
	x := uint64(*r)
	x ^= x >> 12
	x ^= x << 25
	x ^= x >> 27
	*r = rng(x)
	return x * 0x2545f4914f6cdd1d
}

func fillRandom(b []byte, seed uint64) {
	r := rng(seed | 1)
	for i := 0; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.next())
	}
}

// fillText writes compressible, non-zero data: lines of words.
func fillText(b []byte, seed uint64) {
	words := []string{"kvmckpt ", "guest ", "page ", "memory ", "checkpoint ", "restore ", "\n"}
	r := rng(seed | 1)
	for i := 0; i < len(b); {
		i += copy(b[i:], words[r.next()%uint64(len(words))])
	}
}

func mmapAnon(size int) ([]byte, error) {
	return syscall.Mmap(-1, 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS|syscall.MAP_POPULATE)
}

// churn dirties memory and gives it back to the guest kernel.
func churn(cfg config) error {
	half := cfg.churn / 2 * mib
	if half == 0 {
		return nil
	}
	path := tmpfsDir + "/churn"
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	buf := make([]byte, mib)
	fillRandom(buf, cfg.seed+1000)
	for off := 0; off < half; off += mib {
		if _, err := f.Write(buf); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Close(); err != nil {
		return err
	}
	anon, err := mmapAnon(cfg.churn*mib - half)
	if err != nil {
		return err
	}
	fillRandom(anon, cfg.seed+2000)
	if err := syscall.Munmap(anon); err != nil {
		return err
	}
	return os.Remove(path)
}

// keptData is the data the workload keeps, with a CRC per MiB so it can
// tell after a restore whether every byte came back.
type keptData struct {
	regions []region
}

type region struct {
	name string
	data []byte
	crcs []uint32
}

func (k *keptData) mib() int {
	n := 0
	for _, r := range k.regions {
		n += len(r.data) / mib
	}
	return n
}

func (k *keptData) verify() string {
	for _, r := range k.regions {
		for i, want := range r.crcs {
			if got := crc32.ChecksumIEEE(r.data[i*mib : (i+1)*mib]); got != want {
				return fmt.Sprintf("region=%s mib=%d crc=%08x want=%08x", r.name, i, got, want)
			}
		}
	}
	return ""
}

func newRegion(name string, data []byte) region {
	r := region{name: name, data: data, crcs: make([]uint32, len(data)/mib)}
	for i := range r.crcs {
		r.crcs[i] = crc32.ChecksumIEEE(data[i*mib : (i+1)*mib])
	}
	return r
}

func keep(cfg config) (*keptData, error) {
	k := &keptData{}
	if cfg.anon > 0 {
		b, err := mmapAnon(cfg.anon * mib)
		if err != nil {
			return nil, err
		}
		fillRandom(b, cfg.seed)
		k.regions = append(k.regions, newRegion("anon", b))
	}
	if cfg.text > 0 {
		b, err := mmapAnon(cfg.text * mib)
		if err != nil {
			return nil, err
		}
		fillText(b, cfg.seed+1)
		k.regions = append(k.regions, newRegion("text", b))
	}
	if cfg.tmpfs > 0 {
		f, err := os.OpenFile(tmpfsDir+"/kept", os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		size := cfg.tmpfs * mib
		if err := f.Truncate(int64(size)); err != nil {
			return nil, err
		}
		b, err := syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED|syscall.MAP_POPULATE)
		if err != nil {
			return nil, err
		}
		fillRandom(b, cfg.seed+2)
		k.regions = append(k.regions, newRegion("tmpfs", b))
	}
	return k, nil
}

// truthSymbols are the kernel symbols whose runtime addresses the
// introspection tests compare with what kvmckpt finds.
var truthSymbols = map[string]bool{
	"_text": true, "_stext": true, "_etext": true, "_end": true, "linux_banner": true,
	"node_data": true, "node_states": true, "page_offset_base": true,
	"vmemmap_base": true, "vmalloc_base": true, "init_top_pgt": true,
	"__per_cpu_offset": true, "__cpu_possible_mask": true, "nr_cpu_ids": true,
	"vmcoreinfo_data": true, "__start_BTF": true, "__stop_BTF": true,
	"_totalram_pages": true, "init_on_free": true, "init_on_alloc": true,
	"phys_base": true,
}

// Flag bits of /proc/kpageflags (include/uapi/linux/kernel-page-flags.h).
const (
	kpfBuddy  = 10
	kpfNoPage = 20
)

// truth prints what the guest itself knows, for the tests to compare with
// kvmckpt's view from outside:
//
//	KW SYM <name> <hex address>              from /proc/kallsyms
//	KW PAGES max_pfn=N buddy=N noflags=N     counts from /proc/kpageflags
//	KW BUDDY <hex start>+<hex count> ...      runs of free buddy pages
//	KW NOFLAGS <hex start>+<hex count> ...    runs of pages with no flag at
//	                                         all (free pages on per-CPU lists
//	                                         look like this)
//	KW PFN <region> <hex start>+<hex count>   frames holding the kept data
//	KW TRUTH END
//
// and, some seconds after the ready marker, a second snapshot: lines
// BUDDY2, NOFLAGS2, PAGES2, then "KW TRUTH2 END".
func truth(out *bufio.Writer, kept *keptData) error {
	syms, err := os.ReadFile("/proc/kallsyms")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(syms), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && len(f) <= 3 && truthSymbols[f[2]] {
			fmt.Fprintf(out, "KW SYM %s %s\n", f[2], f[0])
		}
	}
	for _, r := range kept.regions {
		if err := printFrames(out, r); err != nil {
			return err
		}
	}
	if err := printTasks(out); err != nil {
		return err
	}
	// Give back what the runtime holds unused, then stop the collector: no
	// page the snapshot below sees in use is freed behind it, so a page the
	// host finds free later was free in the snapshot too.
	runtime.GC()
	debug.FreeOSMemory()
	debug.SetGCPercent(-1)
	if err := pageSnapshot(out, ""); err != nil {
		return err
	}
	// Last, as the snapshot's buffer may have grown the heap's mappings.
	maps, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(strings.TrimSpace(string(maps)), "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			fmt.Fprintf(out, "KW VMA %s\n", f[0])
		}
	}
	fmt.Fprintf(out, "KW TRUTH END\n")
	return out.Flush()
}

// printTasks prints every thread the guest's /proc lists, as "KW TASK
// tgid tid ppid state comm" (comm quoted), then "KW TASKS self=PID
// tid=TID" naming this process and the thread that read /proc (running
// as it did, so its state is R here and not at a later pause), and this
// process's command line as "KW CMDLINE" and its quoted arguments: what
// kvmckpt must find from outside. (truth prints its memory areas, "KW VMA
// start-end", last.)
func printTasks(out *bufio.Writer) error {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return err
	}
	for _, p := range procs {
		tgid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		threads, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", tgid))
		if err != nil {
			continue // exited meanwhile
		}
		for _, th := range threads {
			stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", tgid, th.Name()))
			if err != nil {
				continue
			}
			// "tid (comm) S ppid ...": comm may hold spaces and parens.
			open, end := bytes.IndexByte(stat, '('), bytes.LastIndexByte(stat, ')')
			if open < 0 || end < open {
				return fmt.Errorf("/proc/%d/task/%s/stat: %q", tgid, th.Name(), stat)
			}
			rest := strings.Fields(string(stat[end+1:]))
			if len(rest) < 2 {
				return fmt.Errorf("/proc/%d/task/%s/stat: %q", tgid, th.Name(), stat)
			}
			fmt.Fprintf(out, "KW TASK %d %s %s %s %q\n", tgid, th.Name(), rest[1], rest[0], stat[open+1:end])
		}
	}
	fmt.Fprintf(out, "KW TASKS self=%d tid=%d\n", os.Getpid(), syscall.Gettid())
	cmdline, err := os.ReadFile("/proc/self/cmdline")
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "KW CMDLINE")
	for _, a := range strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00") {
		fmt.Fprintf(out, " %q", a)
	}
	fmt.Fprintln(out)
	return nil
}

// laterSnapshotDelay is when, after the ready marker, the workload takes
// its second page snapshot: a test pauses and scans the guest in between,
// and a page free at the pause was free in at least one of the two unless
// it was allocated and freed again in a few seconds of a quiet guest.
const laterSnapshotDelay = 6 * time.Second

// pageSnapshot prints the runs of free buddy pages and of flagless pages
// from /proc/kpageflags, with suffix after each line's kind.
func pageSnapshot(out *bufio.Writer, suffix string) error {
	flags, err := os.ReadFile("/proc/kpageflags")
	if err != nil {
		return err
	}
	buddy := newRuns(out, "BUDDY"+suffix)
	noflags := newRuns(out, "NOFLAGS"+suffix)
	var nBuddy, nNone uint64
	n := uint64(len(flags) / 8)
	for pfn := uint64(0); pfn < n; pfn++ {
		f := binary.LittleEndian.Uint64(flags[pfn*8:])
		switch {
		case f&(1<<kpfBuddy) != 0:
			nBuddy++
			buddy.add(pfn)
		case f == 0:
			nNone++
			noflags.add(pfn)
		}
	}
	buddy.flush()
	noflags.flush()
	fmt.Fprintf(out, "KW PAGES%s max_pfn=%d buddy=%d noflags=%d\n", suffix, n, nBuddy, nNone)
	return nil
}

// printFrames prints the guest-physical frames that hold a region, from
// /proc/self/pagemap (bit 63 present, bits 0-54 the frame number).
func printFrames(out *bufio.Writer, r region) error {
	pm, err := os.Open("/proc/self/pagemap")
	if err != nil {
		return err
	}
	defer pm.Close()
	addr := uint64(uintptr(unsafe.Pointer(&r.data[0])))
	pages := uint64(len(r.data)) / pageSize
	entries := make([]byte, pages*8)
	if _, err := pm.ReadAt(entries, int64(addr/pageSize*8)); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	runs := newRuns(out, "PFN "+r.name)
	for i := uint64(0); i < pages; i++ {
		e := binary.LittleEndian.Uint64(entries[i*8:])
		if e&(1<<63) == 0 {
			return fmt.Errorf("region %s page %d not present", r.name, i)
		}
		runs.add(e & (1<<55 - 1))
	}
	runs.flush()
	return nil
}

// runs prints ascending page frame numbers as compact runs, a few dozen a
// line.
type runs struct {
	out          *bufio.Writer
	prefix       string
	start, count uint64
	line         bytes.Buffer
}

func newRuns(out *bufio.Writer, prefix string) *runs { return &runs{out: out, prefix: prefix} }

func (r *runs) add(pfn uint64) {
	if r.count > 0 && pfn == r.start+r.count {
		r.count++
		return
	}
	r.emit()
	r.start, r.count = pfn, 1
}

func (r *runs) emit() {
	if r.count == 0 {
		return
	}
	fmt.Fprintf(&r.line, " %x+%x", r.start, r.count)
	r.count = 0
	if r.line.Len() > 900 {
		r.flushLine()
	}
}

func (r *runs) flushLine() {
	if r.line.Len() == 0 {
		return
	}
	fmt.Fprintf(r.out, "KW %s%s\n", r.prefix, r.line.Bytes())
	r.line.Reset()
}

func (r *runs) flush() {
	r.emit()
	r.flushLine()
}

// pageWriter writes pages of its working set at a set rate in a
// deterministic sequence: step i writes page stepPage(i) with content
// stepWord(i, w), after which gen = i+1. Every interval it stops writing
// and replays the sequence 0..gen-1 (from the seed alone) to compute what
// each page must hold, and compares. A checkpoint is of one moment if the
// pages and gen it holds are all of that moment: then a restored guest
// passes the next check. A page copied before its last write, or gen from
// another moment than the pages, fails it. (A step the guest was paused in
// the middle of is finished after the restore, before gen counts it.)
type pageWriter struct {
	buf   []byte
	pages uint64
	rate  int // MiB/s
	seed  uint64
	gen   uint64
}

func newPageWriter(cfg config) (*pageWriter, error) {
	buf, err := syscall.Mmap(-1, 0, cfg.wset*mib, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS|syscall.MAP_POPULATE)
	if err != nil {
		return nil, err
	}
	w := &pageWriter{buf: buf, pages: uint64(cfg.wset * mib / pageSize), rate: cfg.rate, seed: cfg.seed}
	for p := range w.pages {
		w.fill(p, initialStep(p))
	}
	return w, nil
}

// initialStep names the content a page has before any step writes it.
func initialStep(p uint64) uint64 { return 1<<63 | p }

func splitmix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
	x = (x ^ x>>27) * 0x94d049bb133111eb
	return x ^ x>>31
}

func (w *pageWriter) stepPage(i uint64) uint64 { return splitmix(w.seed^i) % w.pages }

func (w *pageWriter) fill(p, step uint64) {
	page := w.buf[p*pageSize : (p+1)*pageSize]
	base := splitmix(w.seed + step*0x632be59bd9b4e019)
	for k := 0; k < pageSize; k += 8 {
		binary.LittleEndian.PutUint64(page[k:], base+uint64(k))
	}
}

func (w *pageWriter) check(p, step uint64) bool {
	page := w.buf[p*pageSize : (p+1)*pageSize]
	base := splitmix(w.seed + step*0x632be59bd9b4e019)
	for k := 0; k < pageSize; k += 8 {
		if binary.LittleEndian.Uint64(page[k:]) != base+uint64(k) {
			return false
		}
	}
	return true
}

// verify replays the sequence up to gen and checks every page.
func (w *pageWriter) verify() string {
	last := make([]uint64, w.pages)
	for p := range last {
		last[p] = initialStep(uint64(p))
	}
	for i := range w.gen {
		last[w.stepPage(i)] = i
	}
	bad := 0
	first := uint64(0)
	for p := range w.pages {
		if !w.check(p, last[p]) {
			if bad == 0 {
				first = p
			}
			bad++
		}
	}
	if bad > 0 {
		return fmt.Sprintf("gen=%d bad_pages=%d first_bad=%d", w.gen, bad, first)
	}
	return ""
}

func (w *pageWriter) run(say func(string, ...any), interval time.Duration) {
	const tick = 10 * time.Millisecond
	perTick := max(1, uint64(w.rate)*mib/pageSize/uint64(time.Second/tick))
	nextCheck := time.Now().Add(interval)
	next := time.Now()
	for {
		for range perTick {
			i := w.gen
			w.fill(w.stepPage(i), i)
			w.gen = i + 1
		}
		if now := time.Now(); now.After(nextCheck) {
			if bad := w.verify(); bad != "" {
				say("WRITER FAIL %s", bad)
			} else {
				say("WRITER OK gen=%d pages=%d", w.gen, w.pages)
			}
			nextCheck = time.Now().Add(interval)
		}
		next = next.Add(tick)
		if d := time.Until(next); d > 0 {
			time.Sleep(d)
		} else {
			next = time.Now() // fell behind: do not burst to catch up
		}
	}
}
