package introspect

import (
	"fmt"
	"strings"

	"github.com/kvmckpt/kvmckpt/profiles"
)

// layout is what the walk needs from a profile, resolved and checked once:
// struct sizes, field offsets and constants.
type layout struct {
	pageSize, pageList, pagePrivate, pageType uint64

	pgdatZones uint64

	zoneSize, zoneLock, zoneFreeArea, zoneStartPFN, zoneSpanned, zonePresent uint64
	zonePCP, zoneVMStat, zoneName                                            uint64

	freeAreaSize, freeAreaList, freeAreaNrFree uint64

	pcpCount, pcpLists, pcpLock uint64

	maxOrder, migrateTypes, pcpTypes, nrPCPLists uint64
	nrFreePages, maxNrZones, maxNumNodes         uint64
	costlyOrder, pageblockOrder                  uint64

	// buddyMapcount is the page_type value of a page on a buddy list
	// (PAGE_BUDDY_MAPCOUNT_VALUE, ~PG_buddy in 6.1).
	buddyMapcount uint32
	spinlockSize  uint64
}

// Limits beyond which a profile is refused: no real kernel comes close, and
// they keep sizes derived from a profile small.
const (
	maxStructSize = 1 << 20
	maxOrderLimit = 16
	maxListsLimit = 64
	maxNodesLimit = 1 << 12
)

// fieldOffset returns the offset of field f of struct st in p, a field of
// width bytes, or adds to *missing what is absent or does not fit.
func fieldOffset(p *profiles.Profile, missing *[]string, st, f string, width uint64) uint64 {
	s, ok := p.Structs[st]
	if !ok {
		*missing = append(*missing, "struct "+st)
		return 0
	}
	fl, ok := s.Fields[f]
	if !ok {
		*missing = append(*missing, st+"."+f)
		return 0
	}
	if fl.Offset+width > s.Size || s.Size > maxStructSize {
		*missing = append(*missing, fmt.Sprintf("%s.%s (offset %d outside size %d)", st, f, fl.Offset, s.Size))
	}
	return fl.Offset
}

func resolveLayout(p *profiles.Profile) (*layout, error) {
	var missing []string
	field := func(st, f string, width uint64) uint64 { return fieldOffset(p, &missing, st, f, width) }
	size := func(st string) uint64 {
		s, ok := p.Structs[st]
		if !ok || s.Size == 0 || s.Size > maxStructSize {
			missing = append(missing, "size of struct "+st)
			return 1
		}
		return s.Size
	}
	constant := func(name string, lo, hi int64) uint64 {
		v, ok := p.Constants[name]
		if !ok {
			missing = append(missing, "constant "+name)
			return uint64(lo)
		}
		if v < lo || v > hi {
			missing = append(missing, fmt.Sprintf("constant %s=%d (want %d..%d)", name, v, lo, hi))
			return uint64(lo)
		}
		return uint64(v)
	}
	l := &layout{}
	l.pageSize = size("page")
	// Since 5.19 (commit "mm/page_alloc: ... buddy_list"), buddy and per-CPU
	// lists link pages through buddy_list/pcp_list, which alias lru.
	listField := "lru"
	if _, ok := p.Structs["page"].Fields["buddy_list"]; ok {
		listField = "buddy_list"
	}
	l.pageList = field("page", listField, 16)
	l.pagePrivate = field("page", "private", 8)
	l.pageType = field("page", "page_type", 4)
	l.pgdatZones = field("pglist_data", "node_zones", 1)
	l.zoneSize = size("zone")
	l.zoneLock = field("zone", "lock", 4)
	l.zoneFreeArea = field("zone", "free_area", 1)
	l.zoneStartPFN = field("zone", "zone_start_pfn", 8)
	l.zoneSpanned = field("zone", "spanned_pages", 8)
	l.zonePresent = field("zone", "present_pages", 8)
	l.zonePCP = field("zone", "per_cpu_pageset", 8)
	l.zoneVMStat = field("zone", "vm_stat", 8)
	l.zoneName = field("zone", "name", 8)
	l.freeAreaSize = size("free_area")
	l.freeAreaList = field("free_area", "free_list", 16)
	l.freeAreaNrFree = field("free_area", "nr_free", 8)
	l.pcpCount = field("per_cpu_pages", "count", 4)
	l.pcpLists = field("per_cpu_pages", "lists", 16)
	l.pcpLock = field("per_cpu_pages", "lock", 4)
	l.maxOrder = constant("MAX_ORDER", 1, maxOrderLimit)
	l.migrateTypes = constant("MIGRATE_TYPES", 1, 16)
	l.pcpTypes = constant("MIGRATE_PCPTYPES", 1, 16)
	l.nrPCPLists = constant("NR_PCP_LISTS", 1, maxListsLimit)
	l.nrFreePages = constant("NR_FREE_PAGES", 0, 64)
	l.maxNrZones = constant("MAX_NR_ZONES", 1, 8)
	l.maxNumNodes = constant("MAX_NUMNODES", 1, maxNodesLimit)
	l.costlyOrder = constant("PAGE_ALLOC_COSTLY_ORDER", 0, maxOrderLimit)
	l.pageblockOrder = constant("PAGEBLOCK_ORDER", 0, maxOrderLimit)
	l.buddyMapcount = uint32(constant("PAGE_BUDDY_MAPCOUNT_VALUE", -1<<31, 1<<32-1))
	if fa, ok := p.Structs["zone"].Fields["free_area"]; ok && fa.Count != 0 && fa.Count != l.maxOrder {
		missing = append(missing, "zone.free_area count disagrees with MAX_ORDER")
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("%w: profile %s lacks or mangles %s", ErrProfile, p.Name, strings.Join(missing, ", "))
	}
	// Arrays must lie inside their structs.
	for _, c := range []struct {
		what             string
		off, n, elem, in uint64
	}{
		{"zone.free_area", l.zoneFreeArea, l.maxOrder, l.freeAreaSize, l.zoneSize},
		{"free_area.free_list", l.freeAreaList, l.migrateTypes, 16, l.freeAreaSize},
		{"per_cpu_pages.lists", l.pcpLists, l.nrPCPLists, 16, size("per_cpu_pages")},
		{"zone.vm_stat", l.zoneVMStat, l.nrFreePages + 1, 8, l.zoneSize},
		{"pglist_data.node_zones", l.pgdatZones, l.maxNrZones, l.zoneSize, size("pglist_data")},
	} {
		if c.off+c.n*c.elem > c.in {
			return nil, fmt.Errorf("%w: %s (%d × %d bytes at %d) overruns its struct (%d bytes)", ErrProfile, c.what, c.n, c.elem, c.off, c.in)
		}
	}
	if l.pcpTypes > l.migrateTypes || l.pcpTypes*(l.costlyOrder+1) > l.nrPCPLists {
		return nil, fmt.Errorf("%w: per-CPU list constants do not fit (MIGRATE_PCPTYPES=%d, PAGE_ALLOC_COSTLY_ORDER=%d, NR_PCP_LISTS=%d)", ErrProfile, l.pcpTypes, l.costlyOrder, l.nrPCPLists)
	}
	return l, nil
}

// pcpOrder is the page order of per-CPU list pindex. mm/page_alloc.c
// order_to_pindex() puts orders 0..PAGE_ALLOC_COSTLY_ORDER at
// order*MIGRATE_PCPTYPES+migratetype (the NR_LOWORDER_PCP_LISTS) and
// pageblock-order (THP) blocks on the lists after them: one list in 6.1 as
// released, one per movable and unmovable in later kernels and 6.1 stable
// (NR_PCP_THP, read from the length of per_cpu_pages.lists). ok is false
// for an index past the lists.
func (l *layout) pcpOrder(pindex uint64) (order uint64, ok bool) {
	low := l.pcpTypes * (l.costlyOrder + 1)
	if pindex < low {
		return pindex / l.pcpTypes, true
	}
	if pindex < l.nrPCPLists {
		return l.pageblockOrder, true
	}
	return 0, false
}
