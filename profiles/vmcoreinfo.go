package profiles

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"
)

// maxVmcoreinfo bounds vmcoreinfo text. The kernel's buffer is one page
// (VMCOREINFO_BYTES in include/linux/crash_core.h).
const maxVmcoreinfo = 1 << 20

// vmcoreinfo is the parsed text of the kernel's vmcoreinfo_data, as
// written by kernel/crash_core.c and arch/x86/kernel/crash_core_64.c:
//
//	OSRELEASE=6.1.0-47-amd64
//	BUILD-ID=<40 hex digits>
//	PAGESIZE=4096
//	SYMBOL(node_data)=ffffffff8d6f3c20      (%lx, runtime address)
//	SIZE(page)=64                           (%lu)
//	OFFSET(page.lru)=8                      (%lu)
//	LENGTH(zone.free_area)=11               (%lu)
//	NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-129  (%ld)
//	NUMBER(VMALLOC_START)=0xffffce2440000000 (0x%lx: arch/x86/kernel/vmcore_info_64.c, 6.12)
//	KERNELOFFSET=3a000000                   (%lx, KASLR delta)
type vmcoreinfo struct {
	osRelease, buildID string
	pageSize           int64
	kernelOffset       uint64
	hasKernelOffset    bool
	symbols            map[string]uint64
	sizes              map[string]uint64
	offsets            map[string]uint64
	lengths            map[string]uint64
	numbers            map[string]int64
}

// parseNumber parses a NUMBER() value: decimal (%ld) or, as x86-64
// kernels print addresses (VMALLOC_START, VMEMMAP_START since 6.12),
// hexadecimal with 0x (%lx), kept as the same 64 bits.
func parseNumber(val string) (int64, error) {
	if h, ok := strings.CutPrefix(val, "0x"); ok {
		u, err := strconv.ParseUint(h, 16, 64)
		return int64(u), err
	}
	return strconv.ParseInt(val, 10, 64)
}

// parseVmcoreinfo parses vmcoreinfo text. Unknown keys are ignored (the
// kernel adds keys over time); malformed values of known keys are errors.
// The text ends at the first NUL, since the buffer is zero padded.
func parseVmcoreinfo(b []byte) (*vmcoreinfo, error) {
	if len(b) > maxVmcoreinfo {
		return nil, fmt.Errorf("vmcoreinfo of %d bytes: %w", len(b), ErrTooLarge)
	}
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	v := &vmcoreinfo{
		symbols: map[string]uint64{},
		sizes:   map[string]uint64{},
		offsets: map[string]uint64{},
		lengths: map[string]uint64{},
		numbers: map[string]int64{},
	}
	off := 0
	for line := range strings.SplitSeq(string(b), "\n") {
		lineOff := off
		off += len(line) + 1
		line = strings.TrimSuffix(line, "\r")
		if line == "" {
			continue
		}
		key, val, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		bad := func(err error) error {
			return &FormatError{What: "vmcoreinfo", Off: int64(lineOff), Msg: fmt.Sprintf("bad value in %q", truncate(line, 80)), Err: err}
		}
		kind, name := key, ""
		if i := strings.IndexByte(key, '('); i > 0 && strings.HasSuffix(key, ")") {
			kind, name = key[:i], key[i+1:len(key)-1]
		}
		var err error
		switch kind {
		case "OSRELEASE":
			v.osRelease = val
		case "BUILD-ID":
			v.buildID = strings.ToLower(val)
		case "PAGESIZE":
			v.pageSize, err = strconv.ParseInt(val, 10, 64)
		case "KERNELOFFSET":
			v.kernelOffset, err = strconv.ParseUint(val, 16, 64)
			v.hasKernelOffset = err == nil
		case "SYMBOL":
			v.symbols[name], err = strconv.ParseUint(val, 16, 64)
		case "SIZE":
			v.sizes[name], err = strconv.ParseUint(val, 10, 64)
		case "OFFSET":
			v.offsets[name], err = strconv.ParseUint(val, 10, 64)
		case "LENGTH":
			v.lengths[name], err = strconv.ParseUint(val, 10, 64)
		case "NUMBER":
			v.numbers[name], err = parseNumber(val)
		}
		if err != nil {
			return nil, bad(err)
		}
	}
	return v, nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// vmcoreinfoNumbers are NUMBER() entries copied into profile constants:
// build properties only, not runtime values like phys_base or sme_mask.
var vmcoreinfoNumbers = []string{
	"PAGE_BUDDY_MAPCOUNT_VALUE", "PAGE_OFFLINE_MAPCOUNT_VALUE",
	"PAGE_HUGETLB_MAPCOUNT_VALUE", "PAGE_UNACCEPTED_MAPCOUNT_VALUE",
	"PG_lru", "PG_private", "PG_swapcache", "PG_swapbacked", "PG_slab",
	"PG_hwpoison", "PG_head_mask", "PG_hugetlb", "PG_offline", "PG_unaccepted",
	"KERNEL_IMAGE_SIZE",
}

// crossCheck compares what the profile derived from BTF with what the
// kernel itself wrote into vmcoreinfo. vmcoreinfo struct names are C names
// without "struct"; only structs and fields the profile has are compared.
func (v *vmcoreinfo) crossCheck(p *Profile) error {
	const src = "vmcoreinfo"
	mismatch := func(what string, got, want any) error {
		return &MismatchError{What: what, Source: src, Got: fmt.Sprint(got), Want: fmt.Sprint(want)}
	}
	if v.osRelease != "" && p.Release != "" && v.osRelease != p.Release {
		return mismatch("OSRELEASE", p.Release, v.osRelease)
	}
	if v.buildID != "" && p.BuildID != "" && v.buildID != p.BuildID {
		return mismatch("BUILD-ID", p.BuildID, v.buildID)
	}
	for _, name := range sortedKeys(v.sizes) {
		if s, ok := p.Structs[name]; ok && s.Size != v.sizes[name] {
			return mismatch("SIZE("+name+")", s.Size, v.sizes[name])
		}
	}
	for _, key := range sortedKeys(v.offsets) {
		sname, fname, _ := strings.Cut(key, ".")
		if f, ok := p.Structs[sname].Fields[fname]; ok && f.Offset != v.offsets[key] {
			return mismatch("OFFSET("+key+")", f.Offset, v.offsets[key])
		}
	}
	for _, key := range sortedKeys(v.lengths) {
		sname, fname, isField := strings.Cut(key, ".")
		if !isField {
			continue
		}
		if f, ok := p.Structs[sname].Fields[fname]; ok && f.Count != v.lengths[key] {
			return mismatch("LENGTH("+key+")", f.Count, v.lengths[key])
		}
	}
	if n, ok := v.numbers["NR_FREE_PAGES"]; ok {
		if c, have := p.Constants["NR_FREE_PAGES"]; have && c != n {
			return mismatch("NUMBER(NR_FREE_PAGES)", c, n)
		}
	}
	if n, ok := v.lengths["node_data"]; ok {
		if c, have := p.Constants["MAX_NUMNODES"]; have && uint64(c) != n {
			return mismatch("LENGTH(node_data)", c, n)
		}
	}
	if v.pageSize != 0 && v.pageSize != pageSizeX86 {
		return mismatch("PAGESIZE", pageSizeX86, v.pageSize)
	}
	return nil
}
