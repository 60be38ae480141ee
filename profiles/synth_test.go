package profiles

import (
	"bytes"
	"cmp"
	"debug/elf"
	"encoding/binary"
	"slices"
	"testing"

	"github.com/cilium/ebpf/btf"
	kgzip "github.com/klauspost/compress/gzip"
	"github.com/stretchr/testify/require"
)

// A synthetic kernel: just enough of a 6.1 x86_64 image (kallsyms, BTF,
// banner, build ID note, boot_params) for the builders, with the struct
// layouts of Debian's 6.1.0-47-amd64 so that tests run without a real
// kernel (-short) and fuzz targets have small seeds.

const (
	synthBanner  = "Linux version 6.1.0-99-synth (test@example.org) (gcc-12 (Debian 12.2.0-14) 12.2.0) #1 SMP PREEMPT_DYNAMIC Debian 6.1.999-1 (2026-01-01)\n"
	synthRelease = "6.1.0-99-synth"
	synthBuildID = "00112233445566778899aabbccddeeff01234567"
	synthPref    = 0x1000000 // LOAD_PHYSICAL_ADDR
)

type synthOpts struct {
	delta       uint64   // KASLR offset
	prefAddress bool     // fill boot_params.hdr.pref_address
	omit        []string // symbols left out of kallsyms
	btf         []byte   // replaces the BTF blob if set
}

type synthKernel struct {
	img  []byte
	base uint64            // where img is mapped: link base + delta
	syms map[string]uint64 // link-time addresses
}

func bitsOf(bytes uint32) btf.Bits { return btf.Bits(bytes * 8) }

// synthBTF returns raw BTF with the structs and enums a profile reads.
func synthBTF(tb testing.TB) []byte {
	tb.Helper()
	u8 := &btf.Int{Name: "unsigned char", Size: 1}
	u16 := &btf.Int{Name: "short unsigned int", Size: 2}
	s16 := &btf.Int{Name: "short int", Size: 2, Encoding: btf.Signed}
	s32 := &btf.Int{Name: "int", Size: 4, Encoding: btf.Signed}
	u32 := &btf.Int{Name: "unsigned int", Size: 4}
	u64 := &btf.Int{Name: "long unsigned int", Size: 8}
	s64 := &btf.Int{Name: "long long int", Size: 8, Encoding: btf.Signed}
	char := &btf.Int{Name: "char", Size: 1, Encoding: btf.Char}
	arr := func(t btf.Type, n uint32) *btf.Array { return &btf.Array{Index: u32, Type: t, Nelems: n} }
	m := func(name string, t btf.Type, off uint32) btf.Member {
		return btf.Member{Name: name, Type: t, Offset: bitsOf(off)}
	}

	listHead := &btf.Struct{Name: "list_head", Size: 16}
	lp := &btf.Pointer{Target: listHead}
	listHead.Members = []btf.Member{m("next", lp, 0), m("prev", lp, 8)}
	atomicT := &btf.Typedef{Name: "atomic_t", Type: &btf.Struct{Size: 4, Members: []btf.Member{m("counter", s32, 0)}}}
	atomic64 := &btf.Typedef{Name: "atomic64_t", Type: &btf.Struct{Size: 8, Members: []btf.Member{m("counter", s64, 0)}}}
	atomicLong := &btf.Typedef{Name: "atomic_long_t", Type: atomic64}
	qspin := &btf.Struct{Name: "qspinlock", Size: 4, Members: []btf.Member{
		m("", &btf.Union{Size: 4, Members: []btf.Member{
			m("val", atomicT, 0),
			m("", &btf.Struct{Size: 2, Members: []btf.Member{m("locked", u8, 0), m("pending", u8, 1)}}, 0),
		}}, 0)}}
	rawSpin := &btf.Struct{Name: "raw_spinlock", Size: 4, Members: []btf.Member{m("raw_lock", &btf.Typedef{Name: "arch_spinlock_t", Type: qspin}, 0)}}
	spin := &btf.Struct{Name: "spinlock", Size: 4, Members: []btf.Member{m("", &btf.Union{Size: 4, Members: []btf.Member{m("rlock", rawSpin, 0)}}, 0)}}
	spinT := &btf.Typedef{Name: "spinlock_t", Type: spin}

	page := &btf.Struct{Name: "page", Size: 64}
	page.Members = []btf.Member{
		m("flags", u64, 0),
		m("", &btf.Union{Size: 40, Members: []btf.Member{
			m("", &btf.Struct{Size: 40, Members: []btf.Member{
				m("", &btf.Union{Size: 16, Members: []btf.Member{m("lru", listHead, 0), m("buddy_list", listHead, 0), m("pcp_list", listHead, 0)}}, 0),
				m("mapping", &btf.Pointer{Target: &btf.Void{}}, 16),
				m("index", u64, 24),
				m("private", u64, 32),
			}}, 0),
			m("", &btf.Struct{Size: 24, Members: []btf.Member{
				m("compound_head", u64, 0),
				m("compound_dtor", u8, 8),
				m("compound_order", u8, 9),
				m("compound_mapcount", atomicT, 12),
			}}, 0),
		}}, 8),
		m("", &btf.Union{Size: 4, Members: []btf.Member{m("_mapcount", atomicT, 0), m("page_type", u32, 0)}}, 48),
		m("_refcount", atomicT, 52),
		m("memcg_data", u64, 56),
	}
	freeArea := &btf.Struct{Name: "free_area", Size: 88, Members: []btf.Member{m("free_list", arr(listHead, 5), 0), m("nr_free", u64, 80)}}
	pcp := &btf.Struct{Name: "per_cpu_pages", Size: 256, Members: []btf.Member{
		m("lock", spinT, 0), m("count", s32, 4), m("high", s32, 8), m("batch", s32, 12),
		m("free_factor", s16, 16), m("expire", s16, 18), m("lists", arr(listHead, 14), 24),
	}}
	pgdat := &btf.Struct{Name: "pglist_data", Size: 7744}
	zone := &btf.Struct{Name: "zone", Size: 1536, Members: []btf.Member{
		m("zone_pgdat", &btf.Pointer{Target: pgdat}, 96),
		m("per_cpu_pageset", &btf.Pointer{Target: pcp}, 104),
		m("zone_start_pfn", u64, 128),
		m("managed_pages", atomicLong, 136),
		m("spanned_pages", u64, 144),
		m("present_pages", u64, 152),
		m("name", &btf.Pointer{Target: &btf.Const{Type: char}}, 168),
		m("free_area", arr(freeArea, 11), 256),
		m("lock", spinT, 1232),
		m("vm_stat", arr(atomicLong, 11), 1344),
	}}
	pgdat.Members = []btf.Member{
		m("node_zones", arr(zone, 5), 0),
		m("nr_zones", s32, 7680),
		m("node_start_pfn", u64, 7688),
		m("node_present_pages", u64, 7696),
		m("node_spanned_pages", u64, 7704),
		m("node_id", s32, 7712),
	}
	staticKey := &btf.Struct{Name: "static_key", Size: 16, Members: []btf.Member{m("enabled", atomicT, 0), m("type", u64, 8)}}
	cpumask := &btf.Struct{Name: "cpumask", Size: 1024, Members: []btf.Member{m("bits", arr(u64, 128), 0)}}
	nodemask := &btf.Typedef{Name: "nodemask_t", Type: &btf.Struct{Size: 128, Members: []btf.Member{m("bits", arr(u64, 16), 0)}}}
	setupHeader := &btf.Struct{Name: "setup_header", Size: 0x7b, Members: []btf.Member{
		m("setup_sects", u8, 0), m("version", u16, 0x15), m("pref_address", u64, 0x67),
	}}
	bootParams := &btf.Struct{Name: "boot_params", Size: 4096, Members: []btf.Member{m("hdr", setupHeader, 0x1f1)}}
	enum := func(name string, vals ...string) *btf.Enum {
		e := &btf.Enum{Name: name, Size: 4}
		for i, v := range vals {
			e.Values = append(e.Values, btf.EnumValue{Name: v, Value: uint64(i)})
		}
		return e
	}
	migrate := enum("migratetype", "MIGRATE_UNMOVABLE", "MIGRATE_MOVABLE", "MIGRATE_RECLAIMABLE", "MIGRATE_PCPTYPES", "MIGRATE_ISOLATE", "MIGRATE_TYPES")
	migrate.Values = append(migrate.Values, btf.EnumValue{Name: "MIGRATE_HIGHATOMIC", Value: 3})

	b, err := btf.NewBuilder(nil, nil)
	require.NoError(tb, err)
	for _, t := range []btf.Type{
		page, pgdat, zone, freeArea, listHead, pcp, spinT, atomicT, atomicLong, staticKey, cpumask,
		nodemask, bootParams, migrate,
		enum("zone_stat_item", "NR_FREE_PAGES", "NR_ZONE_LRU_BASE"),
		enum("zone_type", "ZONE_DMA", "ZONE_DMA32", "ZONE_NORMAL", "ZONE_MOVABLE", "ZONE_DEVICE", "__MAX_NR_ZONES"),
		enum("node_states", "N_POSSIBLE", "N_ONLINE", "N_NORMAL_MEMORY", "N_MEMORY", "N_CPU", "N_GENERIC_INITIATOR", "NR_NODE_STATES"),
	} {
		_, err := b.Add(t)
		require.NoError(tb, err)
	}
	raw, err := b.Marshal(nil, nil)
	require.NoError(tb, err)
	return raw
}

// makeSynthKernel lays out the kernel at its link address, then maps it at
// link + delta with kallsyms holding relocated addresses, as KASLR does.
func makeSynthKernel(tb testing.TB, o synthOpts) *synthKernel {
	tb.Helper()
	const link = uint64(testBase)
	w := &imgBuilder{base: link}
	syms := map[string]uint64{}
	var ks []testSym
	add := func(name string, typ byte, addr uint64) {
		syms[name] = addr
		ks = append(ks, testSym{name: name, typ: typ, addr: addr})
	}
	data := func(name string, typ byte, alignment, size int) uint64 {
		w.align(alignment)
		a := w.pos()
		add(name, typ, a)
		w.b = append(w.b, make([]byte, size)...)
		return a
	}

	add("_text", 'T', link)
	add("_stext", 'T', link)
	w.b = append(w.b, randomBytes(5, 0x3000)...)
	for i := range 300 {
		add("synth_func_"+itoa(i), "Tt"[i%2], link+0x10+uint64(i)*0x20)
	}
	add("_etext", 'T', w.pos())
	w.align(4096)
	add("linux_banner", 'D', w.pos())
	w.b = append(w.b, synthBanner...)
	w.b = append(w.b, 0)
	w.align(8)
	add("__start_notes", 'R', w.pos())
	w.u32(4)  // namesz
	w.u32(20) // descsz
	w.u32(3)  // NT_GNU_BUILD_ID
	w.b = append(w.b, "GNU\x00"...)
	id := []byte{0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0x01, 0x23, 0x45, 0x67}
	w.b = append(w.b, id...)
	add("__stop_notes", 'R', w.pos())
	w.align(8)
	add("__start_BTF", 'R', w.pos())
	if o.btf != nil {
		w.b = append(w.b, o.btf...)
	} else {
		w.b = append(w.b, synthBTF(tb)...)
	}
	add("__stop_BTF", 'R', w.pos())
	data("node_data", 'D', 4096, 8*1024)
	data("node_states", 'D', 64, 6*128)
	data("vmemmap_base", 'D', 8, 8)
	data("vmalloc_base", 'D', 8, 8)
	data("page_offset_base", 'D', 8, 8)
	data("__per_cpu_offset", 'D', 64, 8*64)
	data("__cpu_possible_mask", 'D', 64, 1024)
	data("__cpu_online_mask", 'D', 64, 1024)
	data("nr_cpu_ids", 'D', 8, 4)
	data("_totalram_pages", 'D', 8, 8)
	data("init_on_alloc", 'D', 8, 16)
	data("phys_base", 'D', 8, 8)
	data("init_top_pgt", 'D', 4096, 4096)
	bp := data("boot_params", 'D', 4096, 4096)
	if o.prefAddress {
		binary.LittleEndian.PutUint64(w.b[bp-link+0x258:], synthPref)
	}
	data("init_on_free", 'D', 8, 16)
	add("_end", 'B', link+0x800000)

	// kallsyms, sorted by address as scripts/kallsyms.c sorts, relocated.
	slices.SortStableFunc(ks, func(a, b testSym) int { return cmp.Compare(a.addr, b.addr) })
	var reloc []testSym
	for _, s := range []testSym{{"fixed_percpu_data", 'A', 0, true}, {"current_task", 'A', 0x1c40, true}} {
		reloc = append(reloc, s)
	}
	for _, s := range ks {
		if slices.Contains(o.omit, s.name) {
			continue
		}
		s.addr += o.delta
		reloc = append(reloc, s)
	}
	w.align(4096)
	w.base += o.delta
	appendKallsyms(tb, w, reloc, layout61, true)
	return &synthKernel{img: w.b, base: w.base, syms: syms}
}

// elfImage wraps the synthetic kernel (built with delta 0) in an ELF
// vmlinux: one PT_LOAD at the kernel's link address, and an empty per-CPU
// segment at 0 as real kernels have.
func (k *synthKernel) elfImage(tb testing.TB) []byte {
	tb.Helper()
	const dataOff = 0x1000
	var b bytes.Buffer
	hdr := elf.Header64{
		Type: uint16(elf.ET_EXEC), Machine: uint16(elf.EM_X86_64), Version: uint32(elf.EV_CURRENT),
		Entry: k.base, Phoff: 64, Ehsize: 64, Phentsize: 56, Phnum: 2,
	}
	copy(hdr.Ident[:], elf.ELFMAG)
	hdr.Ident[elf.EI_CLASS] = byte(elf.ELFCLASS64)
	hdr.Ident[elf.EI_DATA] = byte(elf.ELFDATA2LSB)
	hdr.Ident[elf.EI_VERSION] = byte(elf.EV_CURRENT)
	require.NoError(tb, binary.Write(&b, binary.LittleEndian, hdr))
	progs := []elf.Prog64{
		{Type: uint32(elf.PT_LOAD), Flags: uint32(elf.PF_R | elf.PF_X), Off: dataOff, Vaddr: k.base, Paddr: synthPref,
			Filesz: uint64(len(k.img)), Memsz: uint64(len(k.img)) + 0x1000, Align: 0x200000},
		{Type: uint32(elf.PT_LOAD), Flags: uint32(elf.PF_R | elf.PF_W), Off: dataOff, Vaddr: 0, Paddr: synthPref + 0x800000,
			Filesz: 0, Memsz: 0x1000, Align: 0x1000},
	}
	require.NoError(tb, binary.Write(&b, binary.LittleEndian, progs))
	b.Write(make([]byte, dataOff-b.Len()))
	b.Write(k.img)
	return b.Bytes()
}

// bzImage wraps a compressed payload in an x86 boot sector and setup
// header (protocol 2.15) as arch/x86/boot/header.S lays them out.
func bzImage(payload []byte) []byte {
	const setupSects = 3
	const payloadOff = 0x3a0
	b := make([]byte, (setupSects+1)*512+payloadOff)
	b[hdrSetupSects] = setupSects
	binary.LittleEndian.PutUint16(b[hdrBootFlag:], 0xaa55)
	copy(b[hdrMagic:], "HdrS")
	binary.LittleEndian.PutUint16(b[hdrVersion:], 0x020f)
	binary.LittleEndian.PutUint32(b[hdrPayloadOff:], payloadOff)
	binary.LittleEndian.PutUint32(b[hdrPayloadLen:], uint32(len(payload)))
	binary.LittleEndian.PutUint64(b[hdrPrefAddress:], synthPref)
	b = append(b, payload...)
	return append(b, make([]byte, 0x100)...) // trailing .bss/.pgtable padding
}

func gzipBytes(tb testing.TB, b []byte) []byte {
	tb.Helper()
	var out bytes.Buffer
	w, err := kgzip.NewWriterLevel(&out, kgzip.BestCompression)
	require.NoError(tb, err)
	_, err = w.Write(b)
	require.NoError(tb, err)
	require.NoError(tb, w.Close())
	return out.Bytes()
}
