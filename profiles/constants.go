package profiles

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
)

// enumLookup returns the value of an enumerator of a named enum.
type enumLookup func(enum, value string) (int64, bool)

// nodeCount is MAX_NUMNODES as some source knows it.
type nodeCount struct {
	n     int64
	exact bool
}

// deriveConstants fills p.Constants from p.Structs, enums and vmcoreinfo
// (vi may be nil). Array lengths come from the struct layouts, so they
// are the kernel's own values:
//
//   - MAX_ORDER: len(zone.free_area), the number of page orders (6.1's
//     MAX_ORDER; NR_PAGE_ORDERS since 6.8).
//   - MIGRATE_TYPES: len(free_area.free_list).
//   - NR_PCP_LISTS: len(per_cpu_pages.lists).
//
// The per-CPU list index maps to a page order as mm/page_alloc.c
// order_to_pindex() lays it out. In 6.1:
//
//	NR_LOWORDER_PCP_LISTS = MIGRATE_PCPTYPES * (PAGE_ALLOC_COSTLY_ORDER + 1)
//	pindex < NR_LOWORDER_PCP_LISTS: order = pindex / MIGRATE_PCPTYPES
//	pindex >= NR_LOWORDER_PCP_LISTS: order = pageblock_order (THP lists)
//
// NR_PCP_THP = NR_PCP_LISTS - NR_LOWORDER_PCP_LISTS is the number of THP
// lists: 0 without CONFIG_TRANSPARENT_HUGEPAGE, 1 in 5.18-6.8, 2 since
// ("one for movable, one for the rest"), MIGRATE_PCPTYPES in 5.13-5.17.
// PAGE_ALLOC_COSTLY_ORDER (3) and pageblock_order (9 on x86_64) are
// macros, so they are defaults; a count that does not fit this scheme
// is an error rather than a guess.
func deriveConstants(p *Profile, enums enumLookup, nodes nodeCount, vi *vmcoreinfo) error {
	c := p.Constants
	arrayLen := func(constant, s, f string) error {
		fl, ok := p.Structs[s].Fields[f]
		if !ok || fl.Count == 0 {
			return &MissingError{Kind: "field", Name: s + "." + f}
		}
		c[constant] = int64(fl.Count)
		return nil
	}
	if err := arrayLen("MAX_ORDER", "zone", "free_area"); err != nil {
		return err
	}
	if err := arrayLen("MIGRATE_TYPES", "free_area", "free_list"); err != nil {
		return err
	}
	if err := arrayLen("NR_PCP_LISTS", "per_cpu_pages", "lists"); err != nil {
		return err
	}
	for _, e := range enumConstants {
		v, ok := enums(e.enum, e.value)
		if !ok {
			if e.required {
				return &MissingError{Kind: "enum value", Name: "enum " + e.enum + " " + e.value}
			}
			continue
		}
		c[e.constant] = v
	}

	switch {
	case vi != nil && vi.lengths["node_data"] > 0:
		c["MAX_NUMNODES"] = int64(vi.lengths["node_data"])
	case nodes.n > 0:
		c["MAX_NUMNODES"] = nodes.n
		if !nodes.exact {
			p.addDefault("MAX_NUMNODES")
		}
	default:
		return &MissingError{Kind: "constant", Name: "MAX_NUMNODES"}
	}

	c["PAGE_SIZE"] = pageSizeX86
	if vi != nil && vi.pageSize > 0 {
		c["PAGE_SIZE"] = vi.pageSize
	}
	if vi != nil {
		for _, n := range vmcoreinfoNumbers {
			if v, ok := vi.numbers[n]; ok {
				c[n] = v
			}
		}
	}
	// Since 6.12 a page's type is the top byte of page_type, from enum
	// pagetype (include/linux/page-flags.h: PGTY_buddy = 0xf0, and
	// __folio_set_buddy stores PGTY_buddy << 24), which BTF holds; before,
	// it was a cleared bit of a -1 (PAGE_BUDDY_MAPCOUNT_VALUE = ~PG_buddy),
	// a macro known only from vmcoreinfo or the default.
	for _, t := range []struct{ constant, value string }{
		{"PAGE_BUDDY_MAPCOUNT_VALUE", "PGTY_buddy"},
		{"PAGE_OFFLINE_MAPCOUNT_VALUE", "PGTY_offline"},
	} {
		e, ok := enums("pagetype", t.value)
		if !ok {
			continue
		}
		if e < 0 || e > 0xff {
			return &MismatchError{What: "enum pagetype " + t.value, Source: "BTF", Got: fmt.Sprint(e), Want: "a byte"}
		}
		v := int64(int32(uint32(e) << 24))
		if got, ok := c[t.constant]; ok && got != v {
			return &MismatchError{What: t.constant + " (BTF enum pagetype)", Source: "vmcoreinfo", Got: fmt.Sprint(v), Want: fmt.Sprint(got)}
		}
		c[t.constant] = v
	}
	if _, ok := c["PAGE_BUDDY_MAPCOUNT_VALUE"]; !ok {
		c["PAGE_BUDDY_MAPCOUNT_VALUE"] = defaultBuddyMapcount
		p.addDefault("PAGE_BUDDY_MAPCOUNT_VALUE")
	}
	// PageOffline in the encoding of PageBuddy's default (6.1: ~PG_offline,
	// the bit above PG_buddy); vmcoreinfo states it when the profile is
	// built from guest memory.
	if _, ok := c["PAGE_OFFLINE_MAPCOUNT_VALUE"]; !ok && c["PAGE_BUDDY_MAPCOUNT_VALUE"] == defaultBuddyMapcount {
		c["PAGE_OFFLINE_MAPCOUNT_VALUE"] = defaultOfflineMapcount
		p.addDefault("PAGE_OFFLINE_MAPCOUNT_VALUE")
	}

	c["PAGE_ALLOC_COSTLY_ORDER"] = defaultCostlyOrder
	p.addDefault("PAGE_ALLOC_COSTLY_ORDER")
	c["PAGEBLOCK_ORDER"] = defaultPageblockOrder
	p.addDefault("PAGEBLOCK_ORDER")
	low := c["MIGRATE_PCPTYPES"] * (c["PAGE_ALLOC_COSTLY_ORDER"] + 1)
	thp := c["NR_PCP_LISTS"] - low
	if c["MIGRATE_PCPTYPES"] <= 0 || thp < 0 || thp > c["MIGRATE_PCPTYPES"] {
		return &MismatchError{
			What:   "per_cpu_pages.lists length",
			Source: "order_to_pindex layout (MIGRATE_PCPTYPES * (PAGE_ALLOC_COSTLY_ORDER + 1) + NR_PCP_THP)",
			Got:    fmt.Sprint(c["NR_PCP_LISTS"]),
			Want:   fmt.Sprintf("%d + 0..%d", low, c["MIGRATE_PCPTYPES"]),
		}
	}
	c["NR_LOWORDER_PCP_LISTS"] = low
	c["NR_PCP_THP"] = thp
	return nil
}

func (p *Profile) addDefault(name string) {
	if !slices.Contains(p.Defaults, name) {
		p.Defaults = append(p.Defaults, name)
		slices.Sort(p.Defaults)
	}
}

func sortedKeys[M ~map[K]V, K cmp.Ordered, V any](m M) []K {
	return slices.Sorted(maps.Keys(m))
}
