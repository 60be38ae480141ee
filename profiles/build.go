package profiles

import (
	"fmt"
	"strconv"
)

// startKernelMap is x86_64's __START_KERNEL_map: the kernel text mapping
// starts here, and the kernel is linked at __START_KERNEL_map +
// LOAD_PHYSICAL_ADDR (arch/x86/include/asm/page_64_types.h).
const startKernelMap = 0xffffffff80000000

// kaslrAlign is the minimum CONFIG_PHYSICAL_ALIGN on x86_64. KASLR moves
// the kernel by a multiple of it (arch/x86/boot/compressed/kaslr.c
// find_random_virt_addr).
const kaslrAlign = 0x200000

// buildInput is what one build of a profile starts from.
type buildInput struct {
	img        kernelImage
	vmcoreinfo []byte
	// linkTime is set when img holds the kernel at its link addresses (a
	// vmlinux file), so there is no KASLR offset.
	linkTime bool
	// extSyms are symbols from an ELF symbol table or a System.map, at
	// link addresses; extSource names where they came from.
	extSyms   map[string]uint64
	extSource string
	// elfBTF is the .BTF section of a vmlinux, used if the __start_BTF
	// and __stop_BTF symbols are missing.
	elfBTF []byte
	// elfBuildID is the build ID from the ELF notes, if any.
	elfBuildID string
	// prefAddress is the bzImage's setup header pref_address (the
	// physical load address the kernel was linked for), or 0.
	prefAddress uint64
	source      string
}

// BuildFromKernelMemory builds a profile from a running kernel's image.
//
// img is the kernel image as mapped in virtual memory starting at base:
// for a running guest, read from guest memory from the relocated _text on
// (the caller bounds it; 128 MiB covers text, data and bss of any
// distribution kernel). BuildFromKernelMemory finds and decodes the
// kallsyms tables, reads BTF between __start_BTF and __stop_BTF, and
// reads linux_banner and the build ID note.
//
// vmcoreinfo is the text of the kernel's vmcoreinfo_data, or nil. If
// given, it supplies PAGE_BUDDY_MAPCOUNT_VALUE and the KASLR offset, and
// every SIZE, OFFSET, LENGTH and SYMBOL it states that the profile also
// has must agree with BTF and kallsyms, else the error wraps
// [ErrMismatch].
//
// Addresses in the returned profile are unrelocated. The KASLR offset
// comes from vmcoreinfo KERNELOFFSET, else from the bootloader's copy of
// the setup header (boot_params.hdr.pref_address, the physical address
// the kernel was linked for), else _text is assumed to be linked at
// 0xffffffff81000000 and "_text" is added to [Profile.Defaults].
//
// img and vmcoreinfo are untrusted; errors wrap [ErrNoKallsyms],
// [ErrNoBTF], [ErrMissingSymbol], [ErrMissingType], [ErrMalformed] or
// [ErrMismatch].
func BuildFromKernelMemory(img []byte, base uint64, vmcoreinfo []byte) (*Profile, error) {
	return build(buildInput{img: kernelImage{data: img, base: base}, vmcoreinfo: vmcoreinfo, source: "guest-memory"})
}

// symbolSource resolves symbols from kallsyms, else from an external
// table. Addresses are as stored in the image (relocated for memory).
type symbolSource struct {
	ks  *Kallsyms
	ext map[string]uint64
}

func (s symbolSource) lookup(name string) (addr uint64, abs, ok bool) {
	if s.ks != nil {
		if sym, ok := s.ks.Lookup(name); ok {
			return sym.Addr, sym.Absolute, true
		}
	}
	if a, ok := s.ext[name]; ok {
		return a, a < kernelHalf, true
	}
	return 0, false, false
}

func build(in buildInput) (*Profile, error) {
	var vi *vmcoreinfo
	if in.vmcoreinfo != nil {
		var err error
		if vi, err = parseVmcoreinfo(in.vmcoreinfo); err != nil {
			return nil, fmt.Errorf("parse vmcoreinfo: %w", err)
		}
	}
	ks, kerr := decodeKallsyms(in.img)
	if kerr != nil && len(in.extSyms) == 0 {
		return nil, fmt.Errorf("decode kallsyms: %w", kerr)
	}
	syms := symbolSource{ks: ks, ext: in.extSyms}
	if err := crossCheckExternal(ks, in.extSyms, in.extSource); err != nil {
		return nil, err
	}

	bt, err := loadImageBTF(in, syms)
	if err != nil {
		return nil, err
	}
	p := &Profile{
		Version:   FormatVersion,
		Source:    in.source,
		Symbols:   make(map[string]uint64),
		Constants: make(map[string]int64),
	}
	if p.Structs, err = structsFromBTF(bt); err != nil {
		return nil, fmt.Errorf("read BTF types: %w", err)
	}

	text, _, ok := syms.lookup("_text")
	if !ok {
		return nil, &MissingError{Kind: "symbol", Name: "_text"}
	}
	delta, err := kaslrDelta(in, vi, syms, bt, text)
	if err != nil {
		return nil, err
	}
	if delta.assumed {
		p.addDefault("_text")
	}
	unrelocate := func(a uint64, abs bool) uint64 {
		if abs {
			return a
		}
		return a - delta.off
	}
	for _, list := range [][]string{requiredSymbols, optionalSymbols} {
		for _, name := range list {
			if a, abs, ok := syms.lookup(name); ok {
				p.Symbols[name] = unrelocate(a, abs)
			}
		}
	}
	if ks != nil {
		for name, a := range ks.Tables {
			p.Symbols[name] = unrelocate(a, false)
		}
		p.Constants["KALLSYMS_NUM_SYMS"] = int64(len(ks.Symbols))
	}
	for _, name := range requiredSymbols {
		if _, ok := p.Symbols[name]; !ok {
			return nil, &MissingError{Kind: "symbol", Name: name}
		}
	}

	bannerAddr, _, _ := syms.lookup("linux_banner")
	banner, ok := in.img.cstring(bannerAddr, maxBanner)
	if !ok {
		return nil, formatErr("kernel image", int64(bannerAddr-in.img.base), "linux_banner at %#x is outside the image or unterminated", bannerAddr)
	}
	if err := p.setIdentity(banner); err != nil {
		return nil, fmt.Errorf("read linux_banner: %w", err)
	}
	p.BuildID = imageBuildID(in, syms)

	if err := deriveConstants(p, bt.enumValue, btfNodeCount(bt, ks, syms), vi); err != nil {
		return nil, fmt.Errorf("derive constants: %w", err)
	}
	if vi != nil {
		if err := vi.crossCheck(p); err != nil {
			return nil, fmt.Errorf("cross-check vmcoreinfo: %w", err)
		}
		if err := crossCheckVmcoreinfoSymbols(vi, syms); err != nil {
			return nil, fmt.Errorf("cross-check vmcoreinfo: %w", err)
		}
	}
	if err := p.Validate(); err != nil {
		return nil, fmt.Errorf("validate built profile: %w", err)
	}
	return p, nil
}

// loadImageBTF reads BTF from [__start_BTF, __stop_BTF) in the image, or
// from the ELF .BTF section.
func loadImageBTF(in buildInput, syms symbolSource) (btfTypes, error) {
	blob := in.elfBTF
	start, _, okStart := syms.lookup("__start_BTF")
	stop, _, okStop := syms.lookup("__stop_BTF")
	if okStart && okStop {
		if stop-start > maxBTFSize {
			return btfTypes{}, fmt.Errorf("BTF [%#x, %#x): %w", start, stop, ErrTooLarge)
		}
		b, ok := in.img.rangeBytes(start, stop)
		if !ok {
			return btfTypes{}, formatErr("kernel image", -1, "BTF [%#x, %#x) is outside the image", start, stop)
		}
		blob = b
	}
	if len(blob) == 0 {
		return btfTypes{}, ErrNoBTF
	}
	spec, err := loadBTF(blob)
	if err != nil {
		return btfTypes{}, fmt.Errorf("load BTF: %w", err)
	}
	return btfTypes{spec: spec}, nil
}

type kaslrOffset struct {
	off     uint64
	assumed bool
}

// kaslrDelta returns how far the image's addresses are from link-time
// addresses; see [BuildFromKernelMemory].
func kaslrDelta(in buildInput, vi *vmcoreinfo, syms symbolSource, bt btfTypes, text uint64) (kaslrOffset, error) {
	if in.linkTime {
		if in.prefAddress != 0 && text != startKernelMap+in.prefAddress {
			return kaslrOffset{}, &MismatchError{
				What: "link address of _text", Source: "bzImage setup header (__START_KERNEL_map + pref_address)",
				Got: fmt.Sprintf("%#x", text), Want: fmt.Sprintf("%#x", startKernelMap+in.prefAddress),
			}
		}
		return kaslrOffset{}, nil
	}
	if vi != nil && vi.hasKernelOffset {
		if text < startKernelMap || vi.kernelOffset > text-startKernelMap {
			return kaslrOffset{}, &MismatchError{What: "KASLR offset", Source: "vmcoreinfo KERNELOFFSET",
				Got: fmt.Sprintf("_text at %#x", text), Want: fmt.Sprintf("offset %#x", vi.kernelOffset)}
		}
		return kaslrOffset{off: vi.kernelOffset}, nil
	}
	if d, ok := prefAddressDelta(in.img, syms, bt, text); ok {
		return kaslrOffset{off: d}, nil
	}
	if text < defaultUnrelocatedText {
		return kaslrOffset{}, formatErr("kernel image", -1, "_text at %#x is below the default link address %#x", text, uint64(defaultUnrelocatedText))
	}
	return kaslrOffset{off: text - defaultUnrelocatedText, assumed: true}, nil
}

// prefAddressDelta reads boot_params.hdr.pref_address, which boot loaders
// and the EFI stub copy from the bzImage setup header: LOAD_PHYSICAL_ADDR,
// the physical address the kernel was linked to run at. Field offsets
// come from BTF.
func prefAddressDelta(img kernelImage, syms symbolSource, bt btfTypes, text uint64) (uint64, bool) {
	bp, _, ok := syms.lookup("boot_params")
	if !ok {
		return 0, false
	}
	t, ok := bt.composite("boot_params")
	if !ok {
		return 0, false
	}
	s, err := structLayout(t, maxFieldDepth)
	if err != nil {
		return 0, false
	}
	f, ok := s.Fields["hdr.pref_address"]
	if !ok || f.Size != 8 {
		return 0, false
	}
	pref, ok := img.u64(bp + f.Offset)
	if !ok || pref == 0 || pref%kaslrAlign != 0 || pref >= 1<<30 {
		return 0, false
	}
	linked := startKernelMap + pref
	if text < linked || (text-linked)%kaslrAlign != 0 {
		return 0, false
	}
	return text - linked, true
}

// btfNodeCount finds MAX_NUMNODES without vmcoreinfo: from a BTF variable
// for node_data (rare), else from the size of nodemask_t, a bitmap of
// MAX_NUMNODES bits rounded up to longs, which is exact above 64 nodes.
// For 64 or fewer, the space kallsyms leaves for node_data bounds it.
func btfNodeCount(bt btfTypes, ks *Kallsyms, syms symbolSource) nodeCount {
	if n, ok := bt.arrayVarLen("node_data"); ok {
		return nodeCount{n: n, exact: true}
	}
	size, ok := bt.typeSize("nodemask_t")
	if !ok || size <= 0 {
		return nodeCount{}
	}
	bits := size * 8
	if bits > 64 {
		return nodeCount{n: bits, exact: true}
	}
	n := bits
	if gap, ok := symbolGap(ks, syms, "node_data"); ok {
		for n > 1 && uint64(n)*8 > gap {
			n /= 2
		}
	}
	return nodeCount{n: n}
}

// symbolGap returns the distance from a symbol to the next higher one.
func symbolGap(ks *Kallsyms, syms symbolSource, name string) (uint64, bool) {
	a, _, ok := syms.lookup(name)
	if !ok || ks == nil {
		return 0, false
	}
	best := uint64(0)
	for _, s := range ks.Symbols {
		if s.Addr > a && (best == 0 || s.Addr-a < best) {
			best = s.Addr - a
		}
	}
	return best, best != 0
}

// imageBuildID reads the GNU build ID from the notes between
// __start_notes and __stop_notes, else returns the one from the ELF.
func imageBuildID(in buildInput, syms symbolSource) string {
	start, _, ok1 := syms.lookup("__start_notes")
	stop, _, ok2 := syms.lookup("__stop_notes")
	if ok1 && ok2 {
		if b, ok := in.img.rangeBytes(start, stop); ok {
			if id := buildIDFromNotes(b); id != "" {
				return id
			}
		}
	}
	return in.elfBuildID
}

// crossCheckExternal compares kallsyms with an ELF symbol table or
// System.map for the symbols a profile records.
func crossCheckExternal(ks *Kallsyms, ext map[string]uint64, source string) error {
	if ks == nil || len(ext) == 0 {
		return nil
	}
	for _, list := range [][]string{requiredSymbols, optionalSymbols} {
		for _, name := range list {
			k, ok1 := ks.Lookup(name)
			e, ok2 := ext[name]
			if ok1 && ok2 && k.Addr != e {
				return &MismatchError{What: "symbol " + name, Source: source,
					Got: fmt.Sprintf("%#x", k.Addr), Want: fmt.Sprintf("%#x", e)}
			}
		}
	}
	return nil
}

// crossCheckVmcoreinfoSymbols compares vmcoreinfo SYMBOL() entries (run
// time addresses) with kallsyms for the symbols a profile records. Other
// SYMBOL() entries can hold pointer values rather than addresses
// (VMCOREINFO_SYMBOL_ARRAY(mem_section)), so they are not compared.
func crossCheckVmcoreinfoSymbols(vi *vmcoreinfo, syms symbolSource) error {
	for _, list := range [][]string{requiredSymbols, optionalSymbols} {
		for _, name := range list {
			v, ok1 := vi.symbols[name]
			a, _, ok2 := syms.lookup(name)
			if ok1 && ok2 && v != a {
				return &MismatchError{What: "SYMBOL(" + name + ")", Source: "vmcoreinfo",
					Got: "0x" + strconv.FormatUint(a, 16), Want: "0x" + strconv.FormatUint(v, 16)}
			}
		}
	}
	return nil
}
