package introspect

import (
	"fmt"
)

// MemCounters are the guest kernel's own memory counters, in pages, as
// /proc/meminfo sums them over the nodes (pglist_data's vm_stat) and
// zones (NR_FREE_PAGES). They are the kernel's running counts, exact to
// within the per-CPU deltas not yet folded in.
type MemCounters struct {
	Free, File, Shmem, Dirty, Writeback, Anon uint64
}

// Reclaimable is the page cache a balloon can take without writing
// anything: file pages that are neither tmpfs/shmem nor dirty nor under
// writeback.
func (c MemCounters) Reclaimable() uint64 {
	r := int64(c.File) - int64(c.Shmem) - int64(c.Dirty) - int64(c.Writeback)
	return uint64(max(r, 0))
}

// MemCounters reads the guest's memory counters. The enum values come from
// the profile (BTF's node_stat_item), checked against the length of
// pglist_data.vm_stat; negative counts (per-CPU deltas) read as 0.
func (k *Kernel) MemCounters() (MemCounters, error) {
	p := k.Profile
	items := map[string]uint64{}
	for _, n := range []string{"NR_FILE_PAGES", "NR_SHMEM", "NR_FILE_DIRTY", "NR_WRITEBACK", "NR_ANON_MAPPED", "NR_VM_NODE_STAT_ITEMS"} {
		v, ok := p.Constants[n]
		if !ok || v < 0 || v > 1<<10 {
			return MemCounters{}, fmt.Errorf("%w: no enum node_stat_item value %s", ErrProfile, n)
		}
		items[n] = uint64(v)
	}
	f, ok := p.Structs["pglist_data"].Fields["vm_stat"]
	if !ok || f.Count != items["NR_VM_NODE_STAT_ITEMS"] || f.Size != 8*f.Count {
		return MemCounters{}, fmt.Errorf("%w: pglist_data.vm_stat is not NR_VM_NODE_STAT_ITEMS (%d) longs", ErrProfile, items["NR_VM_NODE_STAT_ITEMS"])
	}
	l := k.layout
	nodes, _, err := k.nodes()
	if err != nil {
		return MemCounters{}, fmt.Errorf("%w: %w", ErrKernel, err)
	}
	var c MemCounters
	add := func(dst *uint64, va VAddr) error {
		v, err := k.Uint64(va)
		if err != nil {
			return err
		}
		if int64(v) > 0 {
			*dst += v
		}
		return nil
	}
	for _, n := range nodes {
		nid, pgdat := n.id, n.pgdat
		stat := VAddr(pgdat + f.Offset)
		for _, x := range []struct {
			dst  *uint64
			item string
		}{{&c.File, "NR_FILE_PAGES"}, {&c.Shmem, "NR_SHMEM"}, {&c.Dirty, "NR_FILE_DIRTY"}, {&c.Writeback, "NR_WRITEBACK"}, {&c.Anon, "NR_ANON_MAPPED"}} {
			if err := add(x.dst, stat+VAddr(8*items[x.item])); err != nil {
				return MemCounters{}, fmt.Errorf("%w: node %d's counters: %w", ErrKernel, nid, err)
			}
		}
		for z := uint64(0); z < l.maxNrZones; z++ {
			zone := VAddr(pgdat + l.pgdatZones + z*l.zoneSize)
			if err := add(&c.Free, zone+VAddr(l.zoneVMStat+l.nrFreePages*8)); err != nil {
				return MemCounters{}, fmt.Errorf("%w: node %d zone %d's counters: %w", ErrKernel, nid, z, err)
			}
		}
	}
	return c, nil
}
