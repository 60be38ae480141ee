package introspect

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

// ZoneReport is what the walk found in one zone.
type ZoneReport struct {
	Node     int    `json:"node"`
	Name     string `json:"name"`
	StartPFN uint64 `json:"start_pfn"`
	Spanned  uint64 `json:"spanned_pages"`
	Present  uint64 `json:"present_pages"`
	// BuddyPages and PCPPages are the free pages found on the buddy free
	// lists and on the per-CPU lists.
	BuddyPages uint64 `json:"buddy_pages"`
	PCPPages   uint64 `json:"pcp_pages"`
	// CounterFree is the zone's own NR_FREE_PAGES counter.
	CounterFree int64 `json:"counter_free_pages"`
	// Trusted is false when the walk did not trust the zone: its pages all
	// count as used, and Reason says why.
	Trusted bool   `json:"trusted"`
	Reason  string `json:"reason,omitempty"`
	// PCPSkipped counts per-CPU lists left out (their lock was held or
	// they did not add up); their pages count as used.
	PCPSkipped int `json:"pcp_lists_skipped,omitempty"`
}

// FreePages is the result of a walk: the guest-physical frames the guest
// kernel holds free, with proof for each.
type FreePages struct {
	// Free has a bit per guest page frame, set for free frames.
	Free *pagemap.Bitmap
	// Buddy and PCP count the free frames by where they were found.
	Buddy, PCP uint64
	// OnPCP has the bits of Free that came from per-CPU lists: pages the
	// guest reuses first (the lists are last in, first out).
	OnPCP *pagemap.Bitmap
	Zones []ZoneReport
	// FillByte is what the guest expects in a free page: 0, or the poison
	// byte (0xaa) when page poisoning is on.
	FillByte byte
	// PagePoisoning and InitOnFree report the guest's free-page policy.
	PagePoisoning, InitOnFree bool
	Warnings                  []string
	Duration                  time.Duration
}

// WalkOptions bound a walk.
type WalkOptions struct {
	// Timeout bounds the whole walk; zero means 10 s.
	Timeout time.Duration
	// Tolerance is how far (in pages) the found free pages of a zone may
	// stray from its NR_FREE_PAGES counter before the zone is distrusted;
	// zero means an allowance for per-CPU counter drift (125 pages per
	// possible CPU, the largest vmstat threshold) plus 1/64 of the zone.
	Tolerance uint64
}

// pagePoison is PAGE_POISON from include/linux/poison.h.
const pagePoison = 0xaa

// WalkFree walks the guest kernel's free lists: every online node, every
// populated zone, every order and migrate type of the buddy allocator, and
// the per-CPU lists of every possible CPU. A frame is called free only when
// a consistent list, in a zone whose lock was not held, links its struct
// page with the right type and order; anything else counts as used.
func (k *Kernel) WalkFree(ctx context.Context, opt WalkOptions) (*FreePages, error) {
	start := time.Now()
	if opt.Timeout == 0 {
		opt.Timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, opt.Timeout)
	defer cancel()
	var maxPFN uint64
	for _, m := range k.Mem.Mappings() {
		maxPFN = max(maxPFN, (uint64(m.GPA)+m.Size)/PageSize)
	}
	w := &freeWalker{k: k, l: k.layout, ctx: ctx, opt: opt, maxPFN: maxPFN, res: &FreePages{Free: pagemap.NewBitmap(maxPFN), OnPCP: pagemap.NewBitmap(maxPFN)}, page: make([]byte, k.layout.pageSize)}
	if err := w.policy(); err != nil {
		return nil, err
	}
	if err := w.readCPUs(); err != nil {
		return nil, err
	}
	nodes, repeated, err := k.nodes()
	if err != nil {
		return nil, err
	}
	for _, nid := range repeated {
		w.res.Warnings = append(w.res.Warnings, fmt.Sprintf("node_data[%d] repeats an earlier node; skipped", nid))
	}
	for _, n := range nodes {
		for z := uint64(0); z < w.l.maxNrZones; z++ {
			zone := VAddr(n.pgdat + w.l.pgdatZones + z*w.l.zoneSize)
			if err := w.zone(n.id, zone); err != nil {
				return nil, err
			}
		}
	}
	if w.res.Buddy == 0 && w.res.PCP == 0 {
		w.res.Warnings = append(w.res.Warnings, "no free page found at all: the profile may not fit this kernel; every page is saved")
	}
	w.res.Duration = time.Since(start)
	return w.res, nil
}

// node is a NUMA node's pglist_data.
type node struct {
	id    int
	pgdat uint64
}

// nodes returns the nodes of node_data, each once; repeated lists the
// indexes whose entry repeated an earlier node (and were skipped).
func (k *Kernel) nodes() (nodes []node, repeated []uint64, err error) {
	nodeData, err := k.Sym("node_data")
	if err != nil {
		return nil, nil, err
	}
	seen := map[uint64]bool{}
	for nid := uint64(0); nid < k.layout.maxNumNodes; nid++ {
		pgdat, err := k.Uint64(nodeData + VAddr(nid*8))
		if err != nil {
			return nil, nil, fmt.Errorf("read node_data[%d]: %w", nid, err)
		}
		switch {
		case pgdat == 0:
		case seen[pgdat]:
			repeated = append(repeated, nid)
		default:
			seen[pgdat] = true
			nodes = append(nodes, node{id: int(nid), pgdat: pgdat})
		}
	}
	return nodes, repeated, nil
}

type freeWalker struct {
	k      *Kernel
	l      *layout
	ctx    context.Context
	opt    WalkOptions
	maxPFN uint64
	res    *FreePages
	cpus   []possibleCPU
	steps  int
	// page holds one struct page, read whole.
	page []byte
	// pcpBlocks are the blocks of the per-CPU lists being walked, to take
	// back if the CPU's lists turn out inconsistent.
	pcpBlocks []block
	// zonePCP are the blocks of the zone's trusted per-CPU lists.
	zonePCP []block
}

// possibleCPU is a possible CPU and its __per_cpu_offset.
type possibleCPU struct {
	id  int
	off uint64
}

// block is a free block found on a per-CPU list.
type block struct{ pfn, order uint64 }

func (w *freeWalker) policy() error {
	// Static keys: struct static_key starts with atomic_t enabled.
	key := func(name string) bool {
		va, err := w.k.Sym(name)
		if err != nil {
			return false
		}
		v, err := w.k.Uint32(va)
		return err == nil && int32(v) > 0
	}
	w.res.PagePoisoning = key("_page_poisoning_enabled")
	w.res.InitOnFree = key("init_on_free")
	if w.res.PagePoisoning {
		// mm/page_poison.c: free pages hold PAGE_POISON and are checked on
		// allocation, so a restore must put the poison back.
		w.res.FillByte = pagePoison
	}
	return nil
}

func (w *freeWalker) readCPUs() error {
	cpus, err := w.k.possibleCPUs()
	w.cpus = cpus
	return err
}

// possibleCPUs returns the kernel's possible CPUs with their per-CPU
// offsets (__per_cpu_offset), checked against nr_cpu_ids and NR_CPUS.
func (k *Kernel) possibleCPUs() ([]possibleCPU, error) {
	nr, err := k.Sym("nr_cpu_ids")
	if err != nil {
		return nil, err
	}
	n, err := k.Uint32(nr)
	if err != nil {
		return nil, fmt.Errorf("read nr_cpu_ids: %w", err)
	}
	// The possible mask and __per_cpu_offset hold NR_CPUS entries: the
	// size of struct cpumask in bits.
	limit := uint64(1 << 16)
	if cm, ok := k.Profile.Structs["cpumask"]; ok && cm.Size > 0 {
		limit = min(limit, cm.Size*8)
	}
	if n == 0 || uint64(n) > limit {
		return nil, fmt.Errorf("%w: nr_cpu_ids is %d (at most %d)", ErrKernel, n, limit)
	}
	mask, err := k.Sym("__cpu_possible_mask")
	if err != nil {
		return nil, err
	}
	offs, err := k.Sym("__per_cpu_offset")
	if err != nil {
		return nil, err
	}
	var cpus []possibleCPU
	for cpu := uint64(0); cpu < uint64(n); cpu++ {
		word, err := k.Uint64(mask + VAddr(cpu/64*8))
		if err != nil {
			return nil, fmt.Errorf("read cpu_possible_mask: %w", err)
		}
		if word&(1<<(cpu%64)) == 0 {
			continue
		}
		off, err := k.Uint64(offs + VAddr(cpu*8))
		if err != nil {
			return nil, fmt.Errorf("read __per_cpu_offset[%d]: %w", cpu, err)
		}
		cpus = append(cpus, possibleCPU{id: int(cpu), off: off})
	}
	return cpus, nil
}

// distrust is a reason to leave a zone or list out.
type distrust struct{ reason string }

func (d *distrust) Error() string { return d.reason }

func untrusted(format string, args ...any) error {
	return &distrust{fmt.Sprintf(format, args...)}
}

func (w *freeWalker) zone(nid int, zone VAddr) error {
	l := w.l
	zb := make([]byte, l.zoneSize)
	if err := w.k.ReadVirt(zb, zone); err != nil {
		return fmt.Errorf("read zone at %v of node %d: %w", zone, nid, err)
	}
	u64 := func(off uint64) uint64 { return binary.LittleEndian.Uint64(zb[off:]) }
	rep := ZoneReport{
		Node:        nid,
		StartPFN:    u64(l.zoneStartPFN),
		Spanned:     u64(l.zoneSpanned),
		Present:     u64(l.zonePresent),
		CounterFree: int64(u64(l.zoneVMStat + l.nrFreePages*8)),
		Trusted:     true,
	}
	if rep.Spanned == 0 || rep.Present == 0 {
		return nil
	}
	rep.Name = w.zoneName(u64(l.zoneName))
	var free *pagemap.Bitmap
	w.zonePCP = w.zonePCP[:0]
	err := w.zoneLists(zone, zb, &rep, &free)
	var d *distrust
	switch {
	case errors.As(err, &d):
		rep.Trusted, rep.Reason = false, err.Error()
		rep.BuddyPages, rep.PCPPages = 0, 0
		w.res.Warnings = append(w.res.Warnings, fmt.Sprintf("node %d zone %s: not trusted, all its pages are saved: %v", nid, rep.Name, err))
	case err != nil:
		return err
	default:
		for start, n := range free.Runs() {
			w.res.Free.SetRange(rep.StartPFN+start, n)
		}
		for _, b := range w.zonePCP {
			w.res.OnPCP.SetRange(b.pfn, 1<<b.order)
		}
		w.res.Buddy += rep.BuddyPages
		w.res.PCP += rep.PCPPages
	}
	w.res.Zones = append(w.res.Zones, rep)
	return nil
}

func (w *freeWalker) zoneName(p uint64) string {
	var b [16]byte
	if err := w.k.ReadVirt(b[:], VAddr(p)); err != nil {
		return fmt.Sprintf("%#x", p)
	}
	n := 0
	for n < len(b) && b[n] >= 0x20 && b[n] < 0x7f {
		n++
	}
	return string(b[:n])
}

// zoneLists walks a zone's lists into free, a bitmap over the zone's span.
func (w *freeWalker) zoneLists(zone VAddr, zb []byte, rep *ZoneReport, free **pagemap.Bitmap) error {
	l := w.l
	if lock := binary.LittleEndian.Uint32(zb[l.zoneLock:]); lock != 0 {
		return untrusted("zone lock held (%#x) when the guest paused", lock)
	}
	if rep.StartPFN >= w.maxPFN || rep.Spanned > w.maxPFN-rep.StartPFN {
		return untrusted("zone span [%#x, %#x) lies outside guest RAM", rep.StartPFN, rep.StartPFN+rep.Spanned)
	}
	// The zone's free frames, relative to its start; it catches a block
	// linked twice or inside another. Its size is bounded by guest RAM
	// (checked above).
	seen := pagemap.NewBitmap(rep.Spanned)
	*free = seen
	for order := uint64(0); order < l.maxOrder; order++ {
		fa := l.zoneFreeArea + order*l.freeAreaSize
		nrFree := binary.LittleEndian.Uint64(zb[fa+l.freeAreaNrFree:])
		var found uint64
		for mt := uint64(0); mt < l.migrateTypes; mt++ {
			head := zone + VAddr(fa+l.freeAreaList+mt*16)
			n, err := w.list(head, rep, order, false, seen)
			if err != nil {
				return fmt.Errorf("order %d migratetype %d: %w", order, mt, err)
			}
			found += n
		}
		if found != nrFree {
			return untrusted("order %d: %d blocks on the lists, nr_free says %d", order, found, nrFree)
		}
		rep.BuddyPages += found << order
	}
	tol := w.opt.Tolerance
	if tol == 0 {
		tol = uint64(len(w.cpus))*125 + rep.Present/64
	}
	if diff := int64(rep.BuddyPages) - rep.CounterFree; diff > int64(tol) || -diff > int64(tol) {
		return untrusted("found %d free pages, the zone's NR_FREE_PAGES counter says %d", rep.BuddyPages, rep.CounterFree)
	}
	pcpBase := binary.LittleEndian.Uint64(zb[l.zonePCP:])
	for _, cpu := range w.cpus {
		if err := w.pcp(VAddr(pcpBase+cpu.off), rep, seen); err != nil {
			var d *distrust
			if !errors.As(err, &d) {
				return err
			}
			// A per-CPU list that cannot be trusted costs only its own
			// pages: leave them out, keep the rest of the zone.
			rep.PCPSkipped++
			w.res.Warnings = append(w.res.Warnings, fmt.Sprintf("node %d zone %s cpu %d: per-CPU lists skipped: %v", rep.Node, rep.Name, cpu.id, err))
			continue
		}
		w.zonePCP = append(w.zonePCP, w.pcpBlocks...)
	}
	return nil
}

// pcp walks one CPU's per-CPU lists of a zone. A distrust error leaves
// seen as it was.
func (w *freeWalker) pcp(pcp VAddr, rep *ZoneReport, seen *pagemap.Bitmap) (err error) {
	l := w.l
	lock, err := w.k.Uint32(pcp + VAddr(l.pcpLock))
	if err != nil {
		// A per_cpu_pageset pointer or offset we cannot follow costs
		// only these lists.
		return untrusted("read per-CPU pages at %v: %v", pcp, err)
	}
	if lock != 0 {
		return untrusted("lock held")
	}
	count, err := w.k.Uint32(pcp + VAddr(l.pcpCount))
	if err != nil {
		return untrusted("read per-CPU count at %v: %v", pcp, err)
	}
	w.pcpBlocks = w.pcpBlocks[:0]
	defer func() {
		if err != nil {
			for _, b := range w.pcpBlocks {
				seen.ClearRange(b.pfn-rep.StartPFN, 1<<b.order)
			}
		}
	}()
	var pages uint64
	for i := uint64(0); i < l.nrPCPLists; i++ {
		order, ok := l.pcpOrder(i)
		n, err := w.list(pcp+VAddr(l.pcpLists+i*16), rep, order, true, seen)
		if err != nil {
			return fmt.Errorf("list %d: %w", i, err)
		}
		if !ok && n > 0 {
			return untrusted("list %d holds pages of unknown order", i)
		}
		pages += n << order
	}
	if pages != uint64(count) {
		return untrusted("lists hold %d pages, count says %d", pages, count)
	}
	rep.PCPPages += pages
	return nil
}

// list walks one free list and marks its blocks in seen (relative to the
// zone's start). It returns the number of blocks, or a distrust error when
// the list is not consistent.
func (w *freeWalker) list(head VAddr, rep *ZoneReport, order uint64, pcp bool, seen *pagemap.Bitmap) (uint64, error) {
	l := w.l
	// A list cannot hold more blocks than the zone has room for.
	limit := rep.Spanned>>order + 1
	prev := head
	next, err := w.k.Uint64(head)
	if err != nil {
		return 0, untrusted("read list head %v: %v", head, err)
	}
	var n uint64
	for VAddr(next) != head {
		if w.steps++; w.steps&1023 == 0 {
			if err := w.ctx.Err(); err != nil {
				return 0, fmt.Errorf("%w: %v", ErrScanTimeout, err)
			}
		}
		if n++; n > limit {
			return 0, untrusted("list at %v longer than the zone (cycle?)", head)
		}
		page := next - l.pageList
		if next < l.pageList || page < w.k.VmemmapBase || (page-w.k.VmemmapBase)%l.pageSize != 0 {
			return 0, untrusted("list at %v links %#x, not a struct page", head, next)
		}
		pfn := (page - w.k.VmemmapBase) / l.pageSize
		if pfn < rep.StartPFN || pfn+1<<order > rep.StartPFN+rep.Spanned || pfn&(1<<order-1) != 0 {
			return 0, untrusted("list at %v links pfn %#x of order %d outside the zone or misaligned", head, pfn, order)
		}
		rel := pfn - rep.StartPFN
		if s, ok := seen.NextSet(rel); ok && s < rel+1<<order {
			return 0, untrusted("pfn %#x linked twice (cycle?) or inside a free block found before", pfn)
		}
		// The whole struct page in one read: one translation.
		sp := w.page
		if err := w.k.ReadVirt(sp, VAddr(page)); err != nil {
			return 0, untrusted("read struct page of pfn %#x: %v", pfn, err)
		}
		if VAddr(binary.LittleEndian.Uint64(sp[l.pageList+8:])) != prev {
			return 0, untrusted("pfn %#x: prev pointer does not point back (list half-linked)", pfn)
		}
		ptype := binary.LittleEndian.Uint32(sp[l.pageType:])
		if !pcp {
			// A buddy block's head has PageBuddy and its order in private.
			if ptype != l.buddyMapcount {
				return 0, untrusted("pfn %#x on a buddy list without PageBuddy (page_type %#x)", pfn, ptype)
			}
			if got := binary.LittleEndian.Uint64(sp[l.pagePrivate:]); got != order {
				return 0, untrusted("pfn %#x on the order-%d list has order %d", pfn, order, got)
			}
		} else {
			if ptype == l.buddyMapcount {
				return 0, untrusted("pfn %#x on a per-CPU list is marked PageBuddy", pfn)
			}
			w.pcpBlocks = append(w.pcpBlocks, block{pfn: pfn, order: order})
		}
		seen.SetRange(rel, 1<<order)
		prev = VAddr(next)
		next = binary.LittleEndian.Uint64(sp[l.pageList:])
	}
	return n, nil
}

// Pages returns the number of free pages: Buddy + PCP.
func (f *FreePages) Pages() uint64 { return f.Buddy + f.PCP }
