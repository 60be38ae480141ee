package introspect

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"testing"
	"time"

	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/profiles"
)

// This file builds synthetic guests for the free-page walk: guest RAM that
// holds what a paused x86-64 Linux 6.1 kernel would, laid out by the real
// profile of Debian's 6.1.0-47-amd64 kernel, so that every struct offset,
// size and constant is the real one.
//
// A synthetic guest has page tables (4- or 5-level, optionally with a PTI
// user PGD next to the kernel PGD), the kernel image at a KASLR-slid
// address holding linux_banner and the variables the walk reads, a direct
// map at a random page_offset_base, a vmemmap at a random vmemmap_base,
// node 0's pglist_data with its zones, and per-CPU areas with each zone's
// per_cpu_pages. Free blocks are added with [synthGuest.addBuddy] and
// [synthGuest.addPCP], or in bulk with [synthGuest.populate]; the builder
// keeps the answer a correct walk must give.

// realProfilePath is the profile the profiles package builds from the real
// Debian 6.1.0-47-amd64 vmlinux (see profiles/realkernel_test.go).
const realProfilePath = "../testdata/profiles/6.1.0-47-amd64-322f4442.json"

func realProfile(tb testing.TB) *profiles.Profile {
	tb.Helper()
	f, err := os.Open(realProfilePath)
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	p, err := profiles.Decode(f)
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

// Zone indices of x86-64 (enum zone_type, include/linux/mmzone.h).
const (
	zoneDMA = iota
	zoneDMA32
	zoneNormal
	zoneMovable
)

// Migrate types (enum migratetype, include/linux/mmzone.h).
const (
	mtUnmovable = iota
	mtMovable
	mtReclaimable
	mtHighAtomic
)

// Default bases of the randomized regions (Documentation/arch/x86/x86_64/mm.rst).
const (
	directMapL4 = 0xffff888000000000
	directMapL5 = 0xff11000000000000
	vmemmapL4   = 0xffffea0000000000
	vmemmapL5   = 0xffd4000000000000
	linkedText  = 0xffffffff81000000 // _text as linked: __START_KERNEL_map + 16 MiB
	hugePage    = 2 << 20
	gigaPage    = 1 << 30
)

// Where the builder puts things in the backed part of guest RAM.
const (
	// synthMetaStart is where metadata (kernel image, vmemmap, pglist_data,
	// per-CPU areas) starts: above ZONE_DMA, like a kernel loaded at
	// CONFIG_PHYSICAL_START, so that ZONE_DMA stays free for free blocks.
	synthMetaStart = 16 << 20
	// synthTables is the size of the page-table area at the end of the
	// backed memory.
	synthTables = 1 << 20
	// synthPCPUnit is the per-CPU area of one CPU and synthPCPAt the
	// per-CPU offset of zone 0's per_cpu_pages in it; the other zones'
	// follow. The rest of the unit holds a nonzero pattern, like the other
	// per-CPU variables of a real kernel.
	synthPCPUnit = 16 << 10
	synthPCPAt   = 0x2000
	// synthFillerMax bounds one mapping of the shared filler backend that
	// stands for RAM nobody reads.
	synthFillerMax = 1 << 30
)

// pfnRange is the half-open range of page frames [start, end).
type pfnRange struct{ start, end uint64 }

func (r pfnRange) len() uint64 {
	if r.end <= r.start {
		return 0
	}
	return r.end - r.start
}

func (r pfnRange) contains(pfn, n uint64) bool { return pfn >= r.start && pfn+n <= r.end }

func (r pfnRange) overlaps(pfn, n uint64) bool { return pfn < r.end && pfn+n > r.start }

func (r pfnRange) String() string { return fmt.Sprintf("[%#x, %#x)", r.start, r.end) }

// synthConfig describes a synthetic guest.
type synthConfig struct {
	la57 bool
	seed uint64
	// ram is the guest's RAM in page frames, 2 MiB aligned. ram[0] starts
	// at 0 and holds the backed bytes; RAM beyond them reads as zeros.
	ram []pfnRange
	// backed is how many bytes at guest-physical 0 are real, writable
	// memory; everything the walk reads lives there.
	backed uint64
	// zones are node 0's zone spans by zone index; an empty span is an
	// unpopulated zone.
	zones []pfnRange
	// cpus is nr_cpu_ids; possible the cpu_possible_mask (0: all).
	cpus     int
	possible uint64
	// pti adds a user PGD after the kernel PGD, mapping only a 2 MiB
	// entry-text page of the kernel image, as page-table isolation does
	// (arch/x86/mm/pti.c).
	pti bool
}

// smallConfig is an 80 MiB guest laid out like a QEMU guest with RAM below
// and above the 4 GiB PCI hole: 64 MiB at 0, 16 MiB at 4 GiB. ZONE_DMA32
// spans the hole, as on a real kernel.
func smallConfig(la57 bool, seed uint64) synthConfig {
	return synthConfig{
		la57:   la57,
		seed:   seed,
		ram:    []pfnRange{{0, 0x4000}, {0x100000, 0x101000}},
		backed: 64 << 20,
		zones:  []pfnRange{zoneDMA: {1, 0x1000}, zoneDMA32: {0x1000, 0x100000}, zoneNormal: {0x100000, 0x101000}},
		cpus:   4,
	}
}

// bigConfig is a 3 GiB guest as QEMU q35 lays it out: 2 GiB below the PCI
// hole, 1 GiB above 4 GiB. Only the first 96 MiB are backed, enough for the
// 48 MiB vmemmap of 786432 frames.
func bigConfig(la57 bool, seed uint64) synthConfig {
	return synthConfig{
		la57:   la57,
		seed:   seed,
		ram:    []pfnRange{{0, 0x80000}, {0x100000, 0x140000}},
		backed: 96 << 20,
		zones:  []pfnRange{zoneDMA: {1, 0x1000}, zoneDMA32: {0x1000, 0x100000}, zoneNormal: {0x100000, 0x140000}},
		cpus:   4,
	}
}

// synthGuest is a synthetic guest under construction, and the answer a walk
// of it must give. Not safe for concurrent use.
type synthGuest struct {
	tb  testing.TB
	cfg synthConfig
	p   *profiles.Profile
	l   *layout
	pt  *pageTables
	ram []byte // backed guest RAM at guest-physical 0 (pt.ram)
	mem *PhysMem
	cr3 uint64

	slide          uint64
	text           VAddr
	pageOffsetBase uint64
	vmemmapBase    uint64
	maxPFN         uint64
	ramBytes       uint64

	bump     PAddr
	reserved []pfnRange       // frames that are never free
	image    map[uint64]PAddr // 2 MiB page of the kernel image -> guest-physical
	vmemmap  map[uint64]PAddr // 2 MiB chunk of the vmemmap -> guest-physical
	pgdat    PAddr
	zones    []*synthZone // by zone index; nil for unpopulated zones
	cpuUnit  []PAddr      // per-CPU area of each CPU below nr_cpu_ids
	lruHeads []uint64     // virtual addresses of the LRU list heads

	// free is the expected answer: every frame on a free list.
	free    *pagemap.Bitmap
	blocks  []synthBlock
	pending []synthBlock // claimed by populate, not yet linked
}

type synthZone struct {
	idx     int
	name    string
	span    pfnRange
	present uint64
	pa      PAddr // struct zone
	// buddy and pcp are the free pages on the buddy and per-CPU lists.
	buddy, pcp uint64
}

// synthBlock is a free block on a list, in the order of its list.
type synthBlock struct {
	zone, mt   int // mt: migrate type of a buddy list
	cpu        int // -1 for a buddy list
	pindex     int // per-CPU list index
	pfn, order uint64
}

func (b synthBlock) pcp() bool { return b.cpu >= 0 }

// kernelSymbols are the kernel image variables a synthetic guest holds.
var kernelSymbols = []string{
	"linux_banner", "page_offset_base", "vmemmap_base", "nr_cpu_ids",
	"__cpu_possible_mask", "__per_cpu_offset", "node_data",
	"init_on_free", "_page_poisoning_enabled", "init_task",
}

// newSynthGuest builds a guest with empty free lists.
func newSynthGuest(tb testing.TB, p *profiles.Profile, cfg synthConfig) *synthGuest {
	tb.Helper()
	l, err := resolveLayout(p)
	if err != nil {
		tb.Fatal(err)
	}
	if cfg.possible == 0 {
		cfg.possible = 1<<cfg.cpus - 1
	}
	if cfg.backed%hugePage != 0 || len(cfg.ram) == 0 || cfg.ram[0].start != 0 || cfg.ram[0].end*PageSize < cfg.backed {
		tb.Fatalf("synthetic guest: backed %#x does not fit RAM %v", cfg.backed, cfg.ram)
	}
	rng := rand.New(rand.NewPCG(cfg.seed, 0x73796e7468))
	g := &synthGuest{
		tb: tb, cfg: cfg, p: p, l: l,
		image:   map[uint64]PAddr{},
		vmemmap: map[uint64]PAddr{},
		bump:    synthMetaStart,
	}
	for _, r := range cfg.ram {
		if r.start%(hugePage/PageSize) != 0 || r.end%(hugePage/PageSize) != 0 || r.len() == 0 {
			tb.Fatalf("synthetic guest: RAM %v not 2 MiB aligned", r)
		}
		g.maxPFN = max(g.maxPFN, r.end)
		g.ramBytes += r.len() * PageSize
	}
	tablesAt := PAddr(cfg.backed - synthTables)
	g.pt = newPageTables(tb, int(cfg.backed), tablesAt, cfg.la57)
	g.ram = g.pt.ram
	g.cr3 = uint64(g.pt.root)
	var userRoot PAddr
	if cfg.pti {
		// The user half of the 8 KiB PGD pair.
		userRoot = g.pt.alloc()
		g.cr3 = uint64(userRoot)
	}
	g.free = pagemap.NewBitmap(g.maxPFN)

	// KASLR: the kernel slides in 2 MiB steps; the direct map and the
	// vmemmap in 1 GiB steps (arch/x86/mm/kaslr.c).
	g.slide = uint64(rng.IntN(256)) * kernelAlign
	g.text = VAddr(linkedText + g.slide)
	if cfg.la57 {
		g.pageOffsetBase = directMapL5 + rng.Uint64N(1<<12)*gigaPage
		g.vmemmapBase = vmemmapL5 - rng.Uint64N(1<<10)*gigaPage
	} else {
		g.pageOffsetBase = directMapL4 + rng.Uint64N(1<<12)*gigaPage
		g.vmemmapBase = vmemmapL4 - rng.Uint64N(1<<10)*gigaPage
	}

	// Kernel image: the 2 MiB pages that hold _text and the variables.
	g.imagePage(0)
	for _, s := range kernelSymbols {
		g.imagePage(g.symOffset(s) / hugePage)
	}
	if cfg.pti {
		// The user PGD maps the entry text, here 14 MiB into the image,
		// and nothing else of the kernel.
		kernelRoot := g.pt.root
		g.pt.root = userRoot
		g.pt.mapPage(g.text+7*hugePage, g.imagePA(0), LevelPD, PTEGlobal)
		g.pt.root = kernelRoot
	}

	// Direct map of all RAM, with 1 GiB pages where aligned.
	for _, r := range cfg.ram {
		for pa := r.start * PageSize; pa < r.end*PageSize; {
			if pa%gigaPage == 0 && pa+gigaPage <= r.end*PageSize {
				g.pt.mapPage(VAddr(g.pageOffsetBase+pa), PAddr(pa), LevelPDPT, PTERW|PTEGlobal|PTENX)
				pa += gigaPage
				continue
			}
			g.pt.mapPage(VAddr(g.pageOffsetBase+pa), PAddr(pa), LevelPD, PTERW|PTEGlobal|PTENX)
			pa += hugePage
		}
	}

	// vmemmap: struct pages of the RAM frames only, in 2 MiB pages, as
	// vmemmap_populate() does per present memory section.
	psize := l.pageSize
	for _, r := range cfg.ram {
		for c := r.start * psize / hugePage; c <= (r.end*psize-1)/hugePage; c++ {
			if _, ok := g.vmemmap[c]; ok {
				continue
			}
			pa := g.alloc(hugePage, hugePage)
			g.vmemmap[c] = pa
			g.pt.mapPage(VAddr(g.vmemmapBase+c*hugePage), pa, LevelPD, PTERW|PTEGlobal|PTENX)
		}
	}
	// Every frame starts allocated and unmapped: _mapcount -1.
	for _, r := range cfg.ram {
		for pfn := r.start; pfn < r.end; pfn++ {
			g.put32(g.pagePA(pfn)+PAddr(l.pageType), 0xffffffff)
		}
	}

	// Kernel variables.
	banner := g.symPA("linux_banner")
	copy(g.ram[banner:], p.Banner+"\n\x00")
	g.put64(g.symPA("page_offset_base"), g.pageOffsetBase)
	g.put64(g.symPA("vmemmap_base"), g.vmemmapBase)
	g.put32(g.symPA("nr_cpu_ids"), uint32(cfg.cpus))
	g.put64(g.symPA("__cpu_possible_mask"), cfg.possible)

	g.buildNode()
	g.buildPerCPU()
	g.reserved = []pfnRange{{0, 1}, {synthMetaStart / PageSize, uint64(g.bump+PageMask) / PageSize}, {uint64(tablesAt) / PageSize, cfg.backed / PageSize}}
	g.mem = g.physMem()
	return g
}

// buildNode lays out node 0: node_data[0], its pglist_data and zones.
func (g *synthGuest) buildNode() {
	l, tb := g.l, g.tb
	tb.Helper()
	g.pgdat = g.alloc(g.p.Structs["pglist_data"].Size, PageSize)
	g.put64(g.symPA("node_data"), g.directVA(g.pgdat))
	pgField := func(name string) PAddr {
		f, ok := g.p.Structs["pglist_data"].Fields[name]
		if !ok {
			tb.Fatalf("profile lacks pglist_data.%s", name)
		}
		return g.pgdat + PAddr(f.Offset)
	}
	var nrZones uint32
	g.zones = make([]*synthZone, l.maxNrZones)
	for z, span := range g.cfg.zones {
		if span.len() == 0 {
			continue
		}
		zone := &synthZone{idx: z, name: [...]string{"DMA", "DMA32", "Normal", "Movable", "Device"}[z], span: span,
			pa: g.pgdat + PAddr(l.pgdatZones+uint64(z)*l.zoneSize)}
		for _, r := range g.cfg.ram {
			lo, hi := max(r.start, span.start), min(r.end, span.end)
			if hi > lo {
				zone.present += hi - lo
			}
		}
		g.zones[z] = zone
		nrZones = uint32(z + 1)
		name := g.text + 0x1100000 + VAddr(z*16)
		copy(g.ram[g.imageVAToPA(name):], zone.name+"\x00")
		g.put64(zone.pa+PAddr(l.zoneStartPFN), span.start)
		g.put64(zone.pa+PAddr(l.zoneSpanned), span.len())
		g.put64(zone.pa+PAddr(l.zonePresent), zone.present)
		g.put64(zone.pa+PAddr(l.zoneName), uint64(name))
		g.put64(zone.pa+PAddr(l.zonePCP), synthPCPAt+uint64(z)*g.p.Structs["per_cpu_pages"].Size)
		g.put64(zone.pa+PAddr(g.p.Structs["zone"].Fields["zone_pgdat"].Offset), g.directVA(g.pgdat))
		g.put64(zone.pa+PAddr(g.p.Structs["zone"].Fields["managed_pages"].Offset), zone.present)
		for order := uint64(0); order < l.maxOrder; order++ {
			for mt := 0; mt < int(l.migrateTypes); mt++ {
				g.initList(g.headPA(z, order, mt))
			}
		}
	}
	g.put32(pgField("nr_zones"), nrZones)
	g.put64(pgField("node_start_pfn"), 0)
	g.put64(pgField("node_spanned_pages"), g.maxPFN)
	g.put64(pgField("node_present_pages"), g.ramBytes/PageSize)
	// The LRU lists of allocated pages: free-list pointers that stray
	// into them meet consistent lists of pages that are not free.
	if f, ok := g.p.Structs["pglist_data"].Fields["__lruvec.lists"]; ok && f.Count > 0 {
		for i := range f.Count {
			pa := g.pgdat + PAddr(f.Offset+i*16)
			g.initList(pa)
			g.lruHeads = append(g.lruHeads, g.directVA(pa))
		}
	}
}

// buildPerCPU lays out a per-CPU area for every CPU below nr_cpu_ids, with
// the zones' per_cpu_pages in it, and __per_cpu_offset.
func (g *synthGuest) buildPerCPU() {
	l := g.l
	pcpSize := g.p.Structs["per_cpu_pages"].Size
	offs := g.symPA("__per_cpu_offset")
	for cpu := range g.cfg.cpus {
		unit := g.alloc(synthPCPUnit, PageSize)
		g.cpuUnit = append(g.cpuUnit, unit)
		for i := uint64(0); i < synthPCPUnit; i += 8 {
			g.put64(unit+PAddr(i), 0x5045524350550000|uint64(cpu)<<8) // "PERCPU" pattern
		}
		// x86-64 per-CPU pointers are offsets from __per_cpu_start, which
		// is 0; __per_cpu_offset[cpu] is the CPU's area.
		g.put64(offs+PAddr(cpu*8), g.directVA(unit))
		for z := range l.maxNrZones {
			pcp := unit + synthPCPAt + PAddr(z*pcpSize)
			clear(g.ram[pcp : pcp+PAddr(pcpSize)])
			g.put32(pcp+PAddr(g.p.Structs["per_cpu_pages"].Fields["high"].Offset), 0x400)
			g.put32(pcp+PAddr(g.p.Structs["per_cpu_pages"].Fields["batch"].Offset), 63)
			for i := range l.nrPCPLists {
				g.initList(pcp + PAddr(l.pcpLists+i*16))
			}
		}
	}
}

// physMem places the backed bytes at guest-physical 0 and a shared filler
// backend everywhere else in RAM.
func (g *synthGuest) physMem() *PhysMem {
	maps := []Mapping{{GPA: 0, Backend: 0, Size: g.cfg.backed}}
	var filler uint64
	for i, r := range g.cfg.ram {
		start := r.start * PageSize
		if i == 0 {
			start = g.cfg.backed
		}
		for pa := start; pa < r.end*PageSize; {
			n := min(r.end*PageSize-pa, synthFillerMax)
			filler = max(filler, n)
			maps = append(maps, Mapping{GPA: PAddr(pa), Backend: 1, Size: n})
			pa += n
		}
	}
	m, err := NewPhysMem([][]byte{g.ram, make([]byte, filler)}, maps)
	if err != nil {
		g.tb.Fatal(err)
	}
	return m
}

// alloc returns size bytes of backed, zeroed guest RAM for metadata.
func (g *synthGuest) alloc(size, align uint64) PAddr {
	g.tb.Helper()
	pa := (g.bump + PAddr(align-1)) &^ PAddr(align-1)
	if uint64(pa)+size > g.cfg.backed-synthTables {
		g.tb.Fatalf("synthetic guest: %#x bytes of backed RAM too few for metadata", g.cfg.backed)
	}
	g.bump = pa + PAddr(size)
	return pa
}

func (g *synthGuest) symOffset(name string) uint64 {
	g.tb.Helper()
	a, ok := g.p.Symbols[name]
	if !ok || a < linkedText || a-linkedText >= 64<<20 {
		g.tb.Fatalf("profile symbol %s at %#x is not in the kernel image", name, a)
	}
	return a - linkedText
}

// imagePage maps the i-th 2 MiB page of the kernel image, if not yet.
func (g *synthGuest) imagePage(i uint64) PAddr {
	if pa, ok := g.image[i]; ok {
		return pa
	}
	pa := g.alloc(hugePage, hugePage)
	g.image[i] = pa
	g.pt.mapPage(g.text+VAddr(i*hugePage), pa, LevelPD, PTEGlobal)
	return pa
}

func (g *synthGuest) imagePA(i uint64) PAddr {
	pa, ok := g.image[i]
	if !ok {
		g.tb.Fatalf("kernel image page %d not mapped", i)
	}
	return pa
}

func (g *synthGuest) imageVAToPA(va VAddr) PAddr {
	off := uint64(va - g.text)
	return g.imagePA(off/hugePage) + PAddr(off%hugePage)
}

// symPA is the guest-physical address of a kernel image symbol.
func (g *synthGuest) symPA(name string) PAddr {
	off := g.symOffset(name)
	return g.imagePA(off/hugePage) + PAddr(off%hugePage)
}

func (g *synthGuest) directVA(pa PAddr) uint64 { return g.pageOffsetBase + uint64(pa) }

// pa translates the kernel virtual addresses the builder uses.
func (g *synthGuest) pa(va uint64) PAddr {
	g.tb.Helper()
	switch {
	case va >= g.pageOffsetBase && va < g.pageOffsetBase+g.maxPFN*PageSize:
		return PAddr(va - g.pageOffsetBase)
	case va >= g.vmemmapBase && va < g.vmemmapBase+g.maxPFN*g.l.pageSize:
		off := va - g.vmemmapBase
		pa, ok := g.vmemmap[off/hugePage]
		if !ok {
			g.tb.Fatalf("vmemmap address %#x not backed", va)
		}
		return pa + PAddr(off%hugePage)
	case va >= uint64(g.text) && va < uint64(g.text)+64<<20:
		return g.imageVAToPA(VAddr(va))
	}
	g.tb.Fatalf("address %#x not known to the synthetic guest", va)
	return 0
}

func (g *synthGuest) put64(pa PAddr, v uint64) { binary.LittleEndian.PutUint64(g.ram[pa:], v) }
func (g *synthGuest) put32(pa PAddr, v uint32) { binary.LittleEndian.PutUint32(g.ram[pa:], v) }
func (g *synthGuest) get64(pa PAddr) uint64    { return binary.LittleEndian.Uint64(g.ram[pa:]) }
func (g *synthGuest) get32(pa PAddr) uint32    { return binary.LittleEndian.Uint32(g.ram[pa:]) }

// Addresses of struct page fields.
func (g *synthGuest) pageVA(pfn uint64) uint64 { return g.vmemmapBase + pfn*g.l.pageSize }
func (g *synthGuest) pagePA(pfn uint64) PAddr  { return g.pa(g.pageVA(pfn)) }
func (g *synthGuest) nodeVA(pfn uint64) uint64 { return g.pageVA(pfn) + g.l.pageList }
func (g *synthGuest) nodePA(pfn uint64) PAddr  { return g.pagePA(pfn) + PAddr(g.l.pageList) }

// Addresses of list heads and counters.
func (g *synthGuest) zone(z int) *synthZone {
	g.tb.Helper()
	if z < 0 || z >= len(g.zones) || g.zones[z] == nil {
		g.tb.Fatalf("zone %d is not populated", z)
	}
	return g.zones[z]
}

func (g *synthGuest) freeAreaPA(z int, order uint64) PAddr {
	return g.zone(z).pa + PAddr(g.l.zoneFreeArea+order*g.l.freeAreaSize)
}

func (g *synthGuest) headPA(z int, order uint64, mt int) PAddr {
	return g.freeAreaPA(z, order) + PAddr(g.l.freeAreaList+uint64(mt)*16)
}

func (g *synthGuest) nrFreePA(z int, order uint64) PAddr {
	return g.freeAreaPA(z, order) + PAddr(g.l.freeAreaNrFree)
}

func (g *synthGuest) counterPA(z int) PAddr {
	return g.zone(z).pa + PAddr(g.l.zoneVMStat+g.l.nrFreePages*8)
}

func (g *synthGuest) pcpPA(z, cpu int) PAddr {
	return g.cpuUnit[cpu] + synthPCPAt + PAddr(uint64(z)*g.p.Structs["per_cpu_pages"].Size)
}

func (g *synthGuest) pcpHeadPA(z, cpu, pindex int) PAddr {
	return g.pcpPA(z, cpu) + PAddr(g.l.pcpLists+uint64(pindex)*16)
}

// initList makes the list head at pa empty: pointing at itself.
func (g *synthGuest) initList(pa PAddr) {
	va := g.directVA(pa)
	g.put64(pa, va)
	g.put64(pa+8, va)
}

// linkTail adds the struct page of pfn at the tail of the list whose head is
// at pa in the direct map, as list_add_tail() does.
func (g *synthGuest) linkTail(head PAddr, pfn uint64) {
	headVA := g.directVA(head)
	last := g.get64(head + 8)
	g.put64(g.pa(last), g.nodeVA(pfn)) // last->next
	g.put64(g.nodePA(pfn), headVA)     // node->next
	g.put64(g.nodePA(pfn)+8, last)     // node->prev
	g.put64(head+8, g.nodeVA(pfn))     // head->prev
}

func (g *synthGuest) inRAM(pfn, n uint64) bool {
	for _, r := range g.cfg.ram {
		if r.contains(pfn, n) {
			return true
		}
	}
	return false
}

func (g *synthGuest) isReserved(pfn, n uint64) bool {
	for _, r := range g.reserved {
		if r.overlaps(pfn, n) {
			return true
		}
	}
	return false
}

func (g *synthGuest) anyFree(pfn, n uint64) bool {
	for i := pfn; i < pfn+n; i++ {
		if g.free.Test(i) {
			return true
		}
	}
	return false
}

// usable reports whether the n frames at pfn are RAM of zone z, allocated
// and not kernel metadata: frames a free block may take.
func (g *synthGuest) usable(z int, pfn, n uint64) bool {
	return g.zones[z] != nil && g.zones[z].span.contains(pfn, n) && g.inRAM(pfn, n) &&
		!g.isReserved(pfn, n) && !g.anyFree(pfn, n)
}

func (g *synthGuest) checkBlock(z int, pfn, order uint64) {
	g.tb.Helper()
	if pfn&(1<<order-1) != 0 || !g.usable(z, pfn, 1<<order) {
		g.tb.Fatalf("synthetic guest: block of order %d at pfn %#x is not aligned, usable RAM of zone %d", order, pfn, z)
	}
}

// addBuddy adds a free block to zone z's free_area[order].free_list[mt],
// as __free_one_page() leaves it: PageBuddy, order in private, nr_free and
// NR_FREE_PAGES counted.
func (g *synthGuest) addBuddy(z int, pfn, order uint64, mt int) {
	g.tb.Helper()
	g.claimBuddy(z, pfn, order, mt)
	b := g.pending[len(g.pending)-1]
	g.pending = g.pending[:len(g.pending)-1]
	g.linkBuddy(z, pfn, order, mt)
	g.blocks = append(g.blocks, b)
}

// claimBuddy makes a block free in the expected answer and queues it for
// linking.
func (g *synthGuest) claimBuddy(z int, pfn, order uint64, mt int) {
	g.tb.Helper()
	g.checkBlock(z, pfn, order)
	g.free.SetRange(pfn, 1<<order)
	g.zones[z].buddy += 1 << order
	g.pending = append(g.pending, synthBlock{zone: z, mt: mt, cpu: -1, pfn: pfn, order: order})
}

// linkBuddy does what addBuddy does to guest memory, without checks and
// without changing the expected answer.
func (g *synthGuest) linkBuddy(z int, pfn, order uint64, mt int) {
	page := g.pagePA(pfn)
	g.put32(page+PAddr(g.l.pageType), g.l.buddyMapcount)
	g.put64(page+PAddr(g.l.pagePrivate), order)
	g.linkTail(g.headPA(z, order, mt), pfn)
	g.put64(g.nrFreePA(z, order), g.get64(g.nrFreePA(z, order))+1)
	g.put64(g.counterPA(z), g.get64(g.counterPA(z))+1<<order)
}

// addPCP adds a free block to per-CPU list pindex of cpu in zone z, as
// free_unref_page_commit() leaves it: not PageBuddy, counted in the
// list's count.
func (g *synthGuest) addPCP(z, cpu, pindex int, pfn uint64) {
	g.tb.Helper()
	order, ok := g.l.pcpOrder(uint64(pindex))
	if !ok {
		g.tb.Fatalf("no per-CPU list %d", pindex)
	}
	g.checkBlock(z, pfn, order)
	g.linkPCP(z, cpu, pindex, pfn)
	g.free.SetRange(pfn, 1<<order)
	g.zones[z].pcp += 1 << order
	g.blocks = append(g.blocks, synthBlock{zone: z, cpu: cpu, pindex: pindex, pfn: pfn, order: order})
}

func (g *synthGuest) linkPCP(z, cpu, pindex int, pfn uint64) {
	order, _ := g.l.pcpOrder(uint64(pindex))
	g.linkTail(g.pcpHeadPA(z, cpu, pindex), pfn)
	count := g.pcpPA(z, cpu) + PAddr(g.l.pcpCount)
	g.put32(count, g.get32(count)+1<<order)
}

// list returns the blocks on a buddy list in list order.
func (g *synthGuest) list(z int, order uint64, mt int) []synthBlock {
	var out []synthBlock
	for _, b := range g.blocks {
		if b.zone == z && !b.pcp() && b.order == order && b.mt == mt {
			out = append(out, b)
		}
	}
	return out
}

// pcpList returns the blocks on a per-CPU list in list order.
func (g *synthGuest) pcpList(z, cpu, pindex int) []synthBlock {
	var out []synthBlock
	for _, b := range g.blocks {
		if b.zone == z && b.cpu == cpu && b.pindex == pindex {
			out = append(out, b)
		}
	}
	return out
}

// findAllocated returns an allocated, usable, order-aligned block of zone z,
// searching from a random frame.
func (g *synthGuest) findAllocated(rng *rand.Rand, z int, order uint64) (uint64, bool) {
	span := g.zones[z].span
	n := uint64(1) << order
	for range 4096 {
		r := g.cfg.ram[rng.IntN(len(g.cfg.ram))]
		lo, hi := max(r.start, span.start), min(r.end, span.end)
		if hi < lo+n {
			continue
		}
		pfn := (lo + rng.Uint64N(hi-lo)) &^ (n - 1)
		if g.usable(z, pfn, n) {
			return pfn, true
		}
	}
	return 0, false
}

// population says how [synthGuest.populate] fills a guest.
type population struct {
	// free and split are the chances that a block of order > 0 is free as
	// a whole or split in halves (else it is allocated); freeOrder0 is the
	// chance that a single page is free.
	free, split, freeOrder0 float64
	// pcpPerCPU is the number of pages to put on each CPU's per-CPU lists
	// in each zone; a quarter of them in blocks of order 1..3, and one
	// pageblock (THP) per CPU and zone if there is room.
	pcpPerCPU int
	// lru links the allocated pages into the node's LRU lists.
	lru bool
}

// mixed is a guest that has run for a while: about 60% of its pages free,
// in blocks of every order, most of the free memory in large blocks.
var mixed = population{free: 0.24, split: 0.6, freeOrder0: 0.6, pcpPerCPU: 200, lru: true}

// fragmented is the worst case for the walk: 60% of the pages free, every
// free page a block of its own.
var fragmented = population{free: 0, split: 1, freeOrder0: 0.6, pcpPerCPU: 200, lru: true}

// populate fills every zone: each usable MAX_ORDER-1 aligned chunk is
// recursively free, allocated, or split (as the buddy allocator splits
// blocks); then the per-CPU lists; then the LRU lists.
func (g *synthGuest) populate(rng *rand.Rand, pop population) {
	g.tb.Helper()
	top := g.l.maxOrder - 1
	g.pending = g.pending[:0]
	for z, zone := range g.zones {
		if zone == nil {
			continue
		}
		for _, r := range g.cfg.ram {
			r := pfnRange{max(r.start, zone.span.start), min(r.end, zone.span.end)}
			if r.len() == 0 {
				continue
			}
			for pfn := r.start &^ (1<<top - 1); pfn < r.end; pfn += 1 << top {
				g.fill(rng, pop, z, r, pfn, top)
			}
		}
	}
	// Free lists are in no pfn order on a guest that has run for a while:
	// blocks are added at the head as they are freed.
	rng.Shuffle(len(g.pending), func(i, j int) { g.pending[i], g.pending[j] = g.pending[j], g.pending[i] })
	for _, b := range g.pending {
		g.linkBuddy(b.zone, b.pfn, b.order, b.mt)
		g.blocks = append(g.blocks, b)
	}
	g.pending = nil
	for z, zone := range g.zones {
		if zone == nil {
			continue
		}
		for cpu := range g.cfg.cpus {
			if g.cfg.possible&(1<<cpu) == 0 {
				continue
			}
			g.fillPCP(rng, pop, z, cpu)
		}
	}
	if pop.lru && len(g.lruHeads) > 0 {
		for _, r := range g.cfg.ram {
			for pfn := r.start; pfn < r.end; pfn++ {
				if g.free.Test(pfn) || g.isReserved(pfn, 1) {
					continue
				}
				g.linkTail(g.pa(g.lruHeads[rng.IntN(len(g.lruHeads))]), pfn)
				if rng.IntN(2) == 0 {
					g.put32(g.pagePA(pfn)+PAddr(g.l.pageType), uint32(rng.IntN(3))) // mapped
				}
			}
		}
	}
}

func (g *synthGuest) fill(rng *rand.Rand, pop population, z int, r pfnRange, pfn, order uint64) {
	n := uint64(1) << order
	if !r.overlaps(pfn, n) {
		return
	}
	if r.contains(pfn, n) && g.usable(z, pfn, n) {
		p := rng.Float64()
		switch {
		case order == 0:
			if p < pop.freeOrder0 {
				g.claimBuddy(z, pfn, 0, randomMT(rng, g.l))
			}
			return
		case p < pop.free:
			g.claimBuddy(z, pfn, order, randomMT(rng, g.l))
			return
		case p >= pop.free+pop.split:
			return
		}
	} else if order == 0 {
		return
	}
	g.fill(rng, pop, z, r, pfn, order-1)
	g.fill(rng, pop, z, r, pfn+n/2, order-1)
}

// randomMT picks a migrate type the way a running guest spreads its free
// blocks: mostly movable.
func randomMT(rng *rand.Rand, l *layout) int {
	switch p := rng.IntN(100); {
	case p < 70:
		return mtMovable
	case p < 85:
		return mtUnmovable
	case p < 95:
		return mtReclaimable
	case p < 98 || l.migrateTypes <= 4:
		return mtHighAtomic
	default:
		return 4 // MIGRATE_CMA or MIGRATE_ISOLATE
	}
}

func (g *synthGuest) fillPCP(rng *rand.Rand, pop population, z, cpu int) {
	pcpTypes := int(g.l.pcpTypes)
	low := pcpTypes * int(g.l.costlyOrder+1)
	if g.l.nrPCPLists > uint64(low) && pop.pcpPerCPU > 0 {
		if pfn, ok := g.findAllocated(rng, z, g.l.pageblockOrder); ok {
			g.addPCP(z, cpu, low+rng.IntN(int(g.l.nrPCPLists)-low), pfn)
		}
	}
	for i := 0; i < pop.pcpPerCPU; i++ {
		pindex := rng.IntN(pcpTypes) // order 0
		if i%4 == 3 {
			pindex = pcpTypes + rng.IntN(low-pcpTypes) // order 1..3
		}
		order, _ := g.l.pcpOrder(uint64(pindex))
		pfn, ok := g.findAllocated(rng, z, order)
		if !ok {
			return
		}
		g.addPCP(z, cpu, pindex, pfn)
	}
}

// kernel opens the guest's kernel as kvmckpt would.
func (g *synthGuest) kernel() *Kernel {
	g.tb.Helper()
	k, err := OpenKernel(g.mem, g.cr3, g.cfg.la57, g.p)
	if err != nil {
		g.tb.Fatalf("OpenKernel: %v", err)
	}
	return k
}

// expect returns the expected free bitmap, leaving out blocks for which
// drop returns true.
func (g *synthGuest) expect(drop func(synthBlock) bool) *pagemap.Bitmap {
	want := pagemap.NewBitmap(g.maxPFN)
	for _, b := range g.blocks {
		if drop == nil || !drop(b) {
			want.SetRange(b.pfn, 1<<b.order)
		}
	}
	return want
}

// newSmallGuest is the standard test guest: [smallConfig], populated with
// [mixed], plus some blocks every test relies on: long lists of order 0 and
// 3 in DMA32, all per-CPU lists used on CPU 0.
func newSmallGuest(tb testing.TB, la57 bool, seed uint64) *synthGuest {
	tb.Helper()
	g := newSynthGuest(tb, realProfile(tb), smallConfig(la57, seed))
	rng := rand.New(rand.NewPCG(seed, 1))
	must := func(pfn uint64, ok bool) uint64 {
		if !ok {
			tb.Fatalf("synthetic guest: no room for the standard blocks (reserved %v)", g.reserved)
		}
		return pfn
	}
	for pindex := int(g.l.nrPCPLists) - 1; pindex >= 0; pindex-- { // large blocks first
		order, _ := g.l.pcpOrder(uint64(pindex))
		n := 3
		if order > g.l.costlyOrder {
			n = 1
		}
		for range n {
			g.addPCP(zoneDMA32, 0, pindex, must(g.findAllocated(rng, zoneDMA32, order)))
		}
	}
	for range 8 {
		g.addBuddy(zoneDMA32, must(g.findAllocated(rng, zoneDMA32, 0)), 0, mtMovable)
		g.addBuddy(zoneDMA32, must(g.findAllocated(rng, zoneDMA32, 3)), 3, mtUnmovable)
	}
	g.populate(rng, population{free: 0.24, split: 0.6, freeOrder0: 0.6, pcpPerCPU: 40, lru: true})
	return g
}

// walk opens the guest's kernel and walks its free lists.
func (g *synthGuest) walk(tb testing.TB) (*FreePages, error) {
	tb.Helper()
	k, err := OpenKernel(g.mem, g.cr3, g.cfg.la57, g.p)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	res, err := k.WalkFree(context.Background(), walkOpts)
	if d := time.Since(start); d > 2*time.Second {
		tb.Errorf("walk took %v", d)
	}
	return res, err
}

// List surgery on a synthetic guest.
func (g *synthGuest) setNext(pfn, va uint64) { g.put64(g.nodePA(pfn), va) }
func (g *synthGuest) setPrev(pfn, va uint64) { g.put64(g.nodePA(pfn)+8, va) }
func (g *synthGuest) setPageType(pfn uint64, v uint32) {
	g.put32(g.pagePA(pfn)+PAddr(g.l.pageType), v)
}

// fillRandom overwrites guest memory [pa, pa+n) with random bytes.
func (g *synthGuest) fillRandom(rng *rand.Rand, pa PAddr, n uint64) {
	for i := range n {
		g.ram[pa+PAddr(i)] = byte(rng.Uint32())
	}
}

// pfnOfStructPage returns the frame whose struct page holds pa, a
// guest-physical address in the vmemmap.
func (g *synthGuest) pfnOfStructPage(pa PAddr) uint64 {
	for c, base := range g.vmemmap {
		if pa >= base && pa < base+hugePage {
			return (c*hugePage + uint64(pa-base)) / g.l.pageSize
		}
	}
	g.tb.Fatalf("%v is not in the vmemmap", pa)
	return 0
}
