package vmtest

import (
	"bufio"
	"fmt"
	"strconv"
	"strings"
)

// Run is a run of page frames [Start, Start+Count).
type Run struct{ Start, Count uint64 }

// Truth is the guest's own view of its memory, printed by the workload
// when started with Workload.Truth (see internal/workload).
type Truth struct {
	// Symbols are runtime addresses from /proc/kallsyms.
	Symbols map[string]uint64
	// MaxPFN is the number of frames /proc/kpageflags covers.
	MaxPFN uint64
	// Buddy are the frames /proc/kpageflags flags as free buddy pages.
	Buddy []Run
	// NoFlags are frames with no flag at all; free pages on per-CPU lists
	// are among them.
	NoFlags []Run
	// BuddyPages and NoFlagPages are the counts the workload printed.
	BuddyPages, NoFlagPages uint64
	// Later is the second snapshot of Buddy and NoFlags, taken a few
	// seconds after the ready marker; nil until the workload printed it.
	Later *Snapshot
	// Frames maps a kept-data region ("anon", "tmpfs", "text") to the
	// frames that hold it.
	Frames map[string][]Run
	// MemTotalKB and MemFreeKB are from /proc/meminfo, after the workload
	// kept its data.
	MemTotalKB, MemFreeKB uint64
	// Tasks are every thread /proc listed, by thread id; Self is the
	// workload's pid and SelfTID the thread that read /proc; Cmdline the
	// workload's arguments.
	Tasks         map[int32]TruthTask
	Self, SelfTID int32
	Cmdline       []string
	// VMAs are the workload's memory areas, [start, end) as
	// /proc/self/maps listed them.
	VMAs [][2]uint64
}

// TruthTask is a thread as the guest's /proc shows it.
type TruthTask struct {
	TGID, TID, PPID int32
	State, Comm     string
}

// Snapshot is a later /proc/kpageflags snapshot.
type Snapshot struct {
	Buddy, NoFlags []Run
}

// FreeOrFlagless reports whether pfn is a free buddy page or has no flag
// in the first snapshot or, if there is one, the later one.
func (t *Truth) FreeOrFlagless(pfn uint64) bool {
	if Contains(t.Buddy, pfn) || Contains(t.NoFlags, pfn) {
		return true
	}
	return t.Later != nil && (Contains(t.Later.Buddy, pfn) || Contains(t.Later.NoFlags, pfn))
}

// ParseTruth parses the workload's serial output. It needs the line
// "KW TRUTH END".
func ParseTruth(serial string) (*Truth, error) {
	t := &Truth{Symbols: map[string]uint64{}, Frames: map[string][]Run{}, Tasks: map[int32]TruthTask{}}
	var later Snapshot
	end := false
	sc := bufio.NewScanner(strings.NewReader(serial))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		i := strings.Index(line, "KW ")
		if i < 0 {
			continue
		}
		f := strings.Fields(line[i+3:])
		if len(f) == 0 {
			continue
		}
		var err error
		switch f[0] {
		case "SYM":
			if len(f) != 3 {
				return nil, fmt.Errorf("parse truth: bad line %q", line)
			}
			var a uint64
			a, err = strconv.ParseUint(f[2], 16, 64)
			t.Symbols[f[1]] = a
		case "BUDDY":
			t.Buddy, err = appendRuns(t.Buddy, f[1:])
		case "BUDDY2":
			later.Buddy, err = appendRuns(later.Buddy, f[1:])
		case "NOFLAGS2":
			later.NoFlags, err = appendRuns(later.NoFlags, f[1:])
		case "NOFLAGS":
			t.NoFlags, err = appendRuns(t.NoFlags, f[1:])
		case "PFN":
			if len(f) < 2 {
				return nil, fmt.Errorf("parse truth: bad line %q", line)
			}
			t.Frames[f[1]], err = appendRuns(t.Frames[f[1]], f[2:])
		case "PAGES":
			kv := keyValues(f[1:])
			t.MaxPFN, t.BuddyPages, t.NoFlagPages = kv["max_pfn"], kv["buddy"], kv["noflags"]
		case "MEM":
			kv := keyValues(f[1:])
			t.MemTotalKB, t.MemFreeKB = kv["total_kb"], kv["free_kb"]
		case "TASK":
			var tt TruthTask
			if len(f) < 6 {
				return nil, fmt.Errorf("parse truth: bad line %q", line)
			}
			_, err = fmt.Sscan(strings.Join(f[1:4], " "), &tt.TGID, &tt.TID, &tt.PPID)
			tt.State = f[4]
			if err == nil {
				// The quoted comm is the rest of the line.
				q := line[strings.Index(line, `"`):]
				tt.Comm, err = strconv.Unquote(q)
			}
			t.Tasks[tt.TID] = tt
		case "VMA":
			var a, b uint64
			lo, hi, ok := strings.Cut(f[len(f)-1], "-")
			if !ok || len(f) != 2 {
				return nil, fmt.Errorf("parse truth: bad line %q", line)
			}
			if a, err = strconv.ParseUint(lo, 16, 64); err == nil {
				b, err = strconv.ParseUint(hi, 16, 64)
			}
			t.VMAs = append(t.VMAs, [2]uint64{a, b})
		case "TASKS":
			kv := keyValues(f[1:])
			t.Self, t.SelfTID = int32(kv["self"]), int32(kv["tid"])
		case "CMDLINE":
			rest := strings.TrimSpace(line[strings.Index(line, "CMDLINE")+len("CMDLINE"):])
			for rest != "" && err == nil {
				var q string
				if q, err = strconv.QuotedPrefix(rest); err == nil {
					var a string
					a, err = strconv.Unquote(q)
					t.Cmdline = append(t.Cmdline, a)
					rest = strings.TrimSpace(rest[len(q):])
				}
			}
		case "TRUTH":
			end = true
		case "TRUTH2":
			t.Later = &later
		}
		if err != nil {
			return nil, fmt.Errorf("parse truth: line %q: %w", line, err)
		}
	}
	if !end {
		return nil, fmt.Errorf("parse truth: no \"KW TRUTH END\" line")
	}
	if got := CountRuns(t.Buddy); got != t.BuddyPages {
		return nil, fmt.Errorf("parse truth: buddy runs hold %d pages, count says %d", got, t.BuddyPages)
	}
	if got := CountRuns(t.NoFlags); got != t.NoFlagPages {
		return nil, fmt.Errorf("parse truth: no-flag runs hold %d pages, count says %d", got, t.NoFlagPages)
	}
	return t, nil
}

func appendRuns(runs []Run, fields []string) ([]Run, error) {
	for _, f := range fields {
		s, c, ok := strings.Cut(f, "+")
		if !ok {
			return nil, fmt.Errorf("run %q: no +", f)
		}
		start, err := strconv.ParseUint(s, 16, 64)
		if err != nil {
			return nil, err
		}
		count, err := strconv.ParseUint(c, 16, 64)
		if err != nil {
			return nil, err
		}
		runs = append(runs, Run{start, count})
	}
	return runs, nil
}

func keyValues(fields []string) map[string]uint64 {
	kv := map[string]uint64{}
	for _, f := range fields {
		if k, v, ok := strings.Cut(f, "="); ok {
			n, _ := strconv.ParseUint(v, 10, 64)
			kv[k] = n
		}
	}
	return kv
}

// CountRuns adds up the frames in runs.
func CountRuns(runs []Run) uint64 {
	var n uint64
	for _, r := range runs {
		n += r.Count
	}
	return n
}

// Contains reports whether pfn lies in one of runs (sorted by Start).
func Contains(runs []Run, pfn uint64) bool {
	lo, hi := 0, len(runs)
	for lo < hi {
		m := (lo + hi) / 2
		switch {
		case pfn < runs[m].Start:
			hi = m
		case pfn >= runs[m].Start+runs[m].Count:
			lo = m + 1
		default:
			return true
		}
	}
	return false
}
