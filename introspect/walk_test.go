package introspect

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/kvmckpt/kvmckpt/pagemap"
	"github.com/kvmckpt/kvmckpt/profiles"
)

// walkOpts bound every walk in these tests: a walk of a small guest takes
// about a millisecond, so one that runs into the timeout is a bug.
var walkOpts = WalkOptions{Timeout: 5 * time.Second}

// diffBitmaps describes how got differs from want, or returns "".
func diffBitmaps(got, want *pagemap.Bitmap) string {
	if got.Len() != want.Len() {
		return fmt.Sprintf("bitmap of %d frames, want %d", got.Len(), want.Len())
	}
	extra, missing := got.Clone(), want.Clone()
	extra.AndNot(want)
	missing.AndNot(got)
	var b strings.Builder
	for _, d := range []struct {
		what string
		bm   *pagemap.Bitmap
	}{{"free but should not be", extra}, {"missing", missing}} {
		if n := d.bm.Count(); n > 0 {
			first, _ := d.bm.NextSet(0)
			fmt.Fprintf(&b, "%d frames %s (first %#x); ", n, d.what, first)
		}
	}
	return b.String()
}

// checkSubset fails unless every frame free in got is free in clean: the
// walk never calls free a frame that is not on a valid list.
func checkSubset(tb testing.TB, got, clean *pagemap.Bitmap) {
	tb.Helper()
	extra := got.Clone()
	extra.AndNot(clean)
	if n := extra.Count(); n > 0 {
		first, _ := extra.NextSet(0)
		tb.Errorf("%d frames called free that are not (first pfn %#x)", n, first)
	}
}

func TestWalkFreeClean(t *testing.T) {
	forBothModes(t, func(t *testing.T, la57 bool) {
		for seed := uint64(1); seed <= 3; seed++ {
			t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
				g := newSmallGuest(t, la57, seed)
				k := g.kernel()
				if k.Slide != g.slide || k.PageOffsetBase != g.pageOffsetBase || k.VmemmapBase != g.vmemmapBase {
					t.Errorf("kernel at slide %#x, page_offset_base %#x, vmemmap_base %#x; want %#x, %#x, %#x",
						k.Slide, k.PageOffsetBase, k.VmemmapBase, g.slide, g.pageOffsetBase, g.vmemmapBase)
				}
				res, err := k.WalkFree(context.Background(), walkOpts)
				if err != nil {
					t.Fatal(err)
				}
				checkClean(t, g, res)
			})
		}
	})
}

// checkClean checks a walk of an uncorrupted guest: exactly the free
// frames, every zone trusted, counts by list kind.
func checkClean(t *testing.T, g *synthGuest, res *FreePages) {
	t.Helper()
	if d := diffBitmaps(res.Free, g.free); d != "" {
		t.Errorf("free bitmap: %s", d)
	}
	var buddy, pcp uint64
	var zones []ZoneReport
	for _, z := range g.zones {
		if z == nil {
			continue
		}
		buddy += z.buddy
		pcp += z.pcp
		zones = append(zones, ZoneReport{
			Node: 0, Name: z.name, StartPFN: z.span.start, Spanned: z.span.len(), Present: z.present,
			BuddyPages: z.buddy, PCPPages: z.pcp, CounterFree: int64(z.buddy), Trusted: true,
		})
	}
	if res.Buddy != buddy || res.PCP != pcp || res.Pages() != res.Free.Count() {
		t.Errorf("found %d buddy + %d per-CPU pages (bitmap %d); want %d + %d", res.Buddy, res.PCP, res.Free.Count(), buddy, pcp)
	}
	if res.OnPCP.Count() != pcp {
		t.Errorf("OnPCP has %d pages, want %d", res.OnPCP.Count(), pcp)
	}
	for pfn := range res.OnPCP.All() {
		if !res.Free.Test(pfn) {
			t.Fatalf("OnPCP pfn %#x not in Free", pfn)
		}
	}
	if fmt.Sprint(res.Zones) != fmt.Sprint(zones) {
		t.Errorf("zones:\n got %+v\nwant %+v", res.Zones, zones)
	}
	if len(res.Warnings) > 0 {
		t.Errorf("warnings: %q", res.Warnings)
	}
	if res.PagePoisoning || res.InitOnFree || res.FillByte != 0 {
		t.Errorf("free-page policy: poisoning %v, init_on_free %v, fill %#x; want none", res.PagePoisoning, res.InitOnFree, res.FillByte)
	}
	if testing.Verbose() {
		t.Logf("%d frames, %d free: %d buddy, %d per-CPU, %d blocks", g.maxPFN, res.Free.Count(), res.Buddy, res.PCP, len(g.blocks))
	}
}

// effect is what a corruption must do to the walk's answer. Blocks the walk
// leaves out must not be called free; every other block must be.
type effect struct {
	// zone is the zone that must be distrusted (-1: none), and reason
	// what its Reason must contain (alternatives separated by "|").
	zone   int
	reason string
	// pcp lists the CPUs whose per-CPU lists in pcpZone (or in every
	// zone: allZones) must be skipped, with pcpReason in the warning.
	pcpZone   int
	pcp       []int
	pcpReason string
	// errOK accepts an error from the walk instead: it leaves the whole
	// guest to be saved, which is conservative.
	errOK bool
	// err is the error the walk must fail with.
	err error
	// subsetOnly checks only that nothing beyond the clean free frames is
	// called free: for damage that cannot add free frames and that the
	// walk need not notice.
	subsetOnly bool
}

const allZones = -2

func distrustZone(z int, reason string) effect { return effect{zone: z, reason: reason, pcpZone: -1} }
func skipPCP(z int, reason string, cpus ...int) effect {
	return effect{zone: -1, pcpZone: z, pcp: cpus, pcpReason: reason}
}

func containsAny(s, alternatives string) bool {
	for _, a := range strings.Split(alternatives, "|") {
		if strings.Contains(s, a) {
			return true
		}
	}
	return false
}

// checkEffect checks a walk of a corrupted guest against the effect the
// corruption must have.
func checkEffect(t *testing.T, g *synthGuest, clean *pagemap.Bitmap, res *FreePages, err error, eff effect) {
	t.Helper()
	if err != nil {
		switch {
		case eff.err != nil && errors.Is(err, eff.err):
		case eff.errOK:
			t.Logf("walk failed, which is conservative: %v", err)
		default:
			t.Fatalf("walk: %v", err)
		}
		return
	}
	if eff.err != nil {
		t.Fatalf("walk succeeded; want an error wrapping %v", eff.err)
	}
	checkSubset(t, res.Free, clean)
	if eff.subsetOnly {
		return
	}
	want := g.expect(func(b synthBlock) bool {
		return b.zone == eff.zone || b.pcp() && (b.zone == eff.pcpZone || eff.pcpZone == allZones) && slices.Contains(eff.pcp, b.cpu)
	})
	if d := diffBitmaps(res.Free, want); d != "" {
		t.Errorf("free bitmap: %s", d)
	}
	for _, rep := range res.Zones {
		z := zoneIndex(t, g, rep.Name)
		switch {
		case z == eff.zone:
			if rep.Trusted || !containsAny(rep.Reason, eff.reason) {
				t.Errorf("zone %s: trusted %v, reason %q; want distrusted for %q", rep.Name, rep.Trusted, rep.Reason, eff.reason)
			}
			if rep.BuddyPages != 0 || rep.PCPPages != 0 {
				t.Errorf("distrusted zone %s reports %d+%d free pages", rep.Name, rep.BuddyPages, rep.PCPPages)
			}
		case !rep.Trusted:
			t.Errorf("zone %s distrusted: %s", rep.Name, rep.Reason)
		}
		skipped := 0
		if z == eff.pcpZone || eff.pcpZone == allZones {
			skipped = len(eff.pcp)
		}
		if rep.PCPSkipped != skipped {
			t.Errorf("zone %s: %d per-CPU lists skipped, want %d (warnings %q)", rep.Name, rep.PCPSkipped, skipped, res.Warnings)
		}
	}
	if eff.pcpReason != "" && !containsAny(strings.Join(res.Warnings, "\n"), eff.pcpReason) {
		t.Errorf("warnings %q do not say %q", res.Warnings, eff.pcpReason)
	}
	if res.Pages() != res.Free.Count() {
		t.Errorf("counted %d+%d free pages, bitmap has %d", res.Buddy, res.PCP, res.Free.Count())
	}
}

func zoneIndex(t *testing.T, g *synthGuest, name string) int {
	t.Helper()
	for _, z := range g.zones {
		if z != nil && z.name == name {
			return z.idx
		}
	}
	t.Fatalf("walk reports zone %q the guest does not have", name)
	return -1
}

// TestWalkFreeCorrupt damages one thing in a clean guest at a time. Each
// walk must end, must not panic, and must answer conservatively: the
// damaged zone distrusted or the damaged per-CPU lists skipped, and every
// other block still found.
func TestWalkFreeCorrupt(t *testing.T) {
	const z = zoneDMA32
	for _, tt := range []struct {
		name    string
		corrupt func(t *testing.T, g *synthGuest) effect
	}{
		// Buddy lists. L is DMA32's order-0 movable list, at least 8 blocks.
		{"cycle", func(t *testing.T, g *synthGuest) effect {
			L := g.list(z, 0, mtMovable)
			g.setNext(L[2].pfn, g.nodeVA(L[0].pfn))
			return distrustZone(z, "cycle")
		}},
		{"self loop", func(t *testing.T, g *synthGuest) effect {
			L := g.list(z, 0, mtMovable)
			g.setNext(L[1].pfn, g.nodeVA(L[1].pfn))
			return distrustZone(z, "cycle")
		}},
		{"cycle with prev pointers to match", func(t *testing.T, g *synthGuest) effect {
			L := g.list(z, 0, mtMovable)
			g.setNext(L[3].pfn, g.nodeVA(L[1].pfn))
			g.setPrev(L[1].pfn, g.nodeVA(L[3].pfn))
			return distrustZone(z, "cycle|prev pointer")
		}},
		{"pointer outside guest RAM", func(t *testing.T, g *synthGuest) effect {
			g.setNext(g.list(z, 0, mtMovable)[1].pfn, g.pageOffsetBase+64<<30)
			return distrustZone(z, "not a struct page")
		}},
		{"struct page beyond guest RAM", func(t *testing.T, g *synthGuest) effect {
			g.setNext(g.list(z, 0, mtMovable)[1].pfn, g.nodeVA(0x200000))
			return distrustZone(z, "outside the zone")
		}},
		{"struct page in the zone's hole", func(t *testing.T, g *synthGuest) effect {
			// DMA32 spans the PCI hole, whose vmemmap is not populated.
			g.setNext(g.list(z, 0, mtMovable)[1].pfn, g.nodeVA(0x80000))
			return distrustZone(z, "read struct page")
		}},
		{"LIST_POISON1", func(t *testing.T, g *synthGuest) effect {
			g.setNext(g.list(z, 0, mtMovable)[1].pfn, 0xdead000000000100)
			return distrustZone(z, "not a struct page")
		}},
		{"NULL next", func(t *testing.T, g *synthGuest) effect {
			g.setNext(g.list(z, 0, mtMovable)[1].pfn, 0)
			return distrustZone(z, "not a struct page")
		}},
		{"misaligned struct page pointer", func(t *testing.T, g *synthGuest) effect {
			L := g.list(z, 0, mtMovable)
			g.setNext(L[1].pfn, g.nodeVA(L[2].pfn)+4)
			return distrustZone(z, "not a struct page")
		}},
		{"pointer to struct page, not its list node", func(t *testing.T, g *synthGuest) effect {
			L := g.list(z, 0, mtMovable)
			g.setNext(L[1].pfn, g.pageVA(L[2].pfn))
			return distrustZone(z, "not a struct page")
		}},
		{"pointer below vmemmap", func(t *testing.T, g *synthGuest) effect {
			g.setNext(g.list(z, 0, mtMovable)[1].pfn, g.vmemmapBase-g.l.pageSize+g.l.pageList)
			return distrustZone(z, "not a struct page")
		}},
		{"prev does not point back", func(t *testing.T, g *synthGuest) effect {
			L := g.list(z, 0, mtMovable)
			g.setPrev(L[2].pfn, g.directVA(g.headPA(z, 0, mtMovable)))
			return distrustZone(z, "prev pointer")
		}},
		{"half-linked: next skips a block", func(t *testing.T, g *synthGuest) effect {
			L := g.list(z, 0, mtMovable)
			g.setNext(L[0].pfn, g.nodeVA(L[2].pfn))
			return distrustZone(z, "prev pointer")
		}},
		{"head points at the second block", func(t *testing.T, g *synthGuest) effect {
			L := g.list(z, 0, mtMovable)
			g.put64(g.headPA(z, 0, mtMovable), g.nodeVA(L[1].pfn))
			return distrustZone(z, "prev pointer")
		}},
		{"not PageBuddy", func(t *testing.T, g *synthGuest) effect {
			g.setPageType(g.list(z, 0, mtMovable)[1].pfn, 0xffffffff)
			return distrustZone(z, "without PageBuddy")
		}},
		{"mapped page on a buddy list", func(t *testing.T, g *synthGuest) effect {
			g.setPageType(g.list(z, 3, mtUnmovable)[1].pfn, 0)
			return distrustZone(z, "without PageBuddy")
		}},
		{"wrong order in private", func(t *testing.T, g *synthGuest) effect {
			b := g.list(z, 3, mtUnmovable)[1]
			g.put64(g.pagePA(b.pfn)+PAddr(g.l.pagePrivate), 4)
			return distrustZone(z, "has order")
		}},
		{"nr_free one too many", func(t *testing.T, g *synthGuest) effect {
			g.put64(g.nrFreePA(z, 3), g.get64(g.nrFreePA(z, 3))+1)
			return distrustZone(z, "nr_free says")
		}},
		{"nr_free one too few", func(t *testing.T, g *synthGuest) effect {
			g.put64(g.nrFreePA(z, 0), g.get64(g.nrFreePA(z, 0))-1)
			return distrustZone(z, "nr_free says")
		}},
		{"NR_FREE_PAGES wildly high", func(t *testing.T, g *synthGuest) effect {
			g.put64(g.counterPA(z), 1<<40)
			return distrustZone(z, "NR_FREE_PAGES")
		}},
		{"NR_FREE_PAGES negative", func(t *testing.T, g *synthGuest) effect {
			g.put64(g.counterPA(z), ^uint64(1<<40-1)) // -(1<<40)
			return distrustZone(z, "NR_FREE_PAGES")
		}},
		{"NR_FREE_PAGES zero", func(t *testing.T, g *synthGuest) effect {
			// ZONE_DMA has about 2400 free pages; the tolerance is 563.
			g.put64(g.counterPA(zoneDMA), 0)
			return distrustZone(zoneDMA, "NR_FREE_PAGES")
		}},
		{"zone lock held", func(t *testing.T, g *synthGuest) effect {
			g.put32(g.zone(z).pa+PAddr(g.l.zoneLock), 1)
			return distrustZone(z, "zone lock held")
		}},
		{"zone lock queued", func(t *testing.T, g *synthGuest) effect {
			// Only the MCS tail set: a CPU waits, the holder just left.
			g.put32(g.zone(z).pa+PAddr(g.l.zoneLock), 1<<18)
			return distrustZone(z, "zone lock held")
		}},
		{"block of another zone", func(t *testing.T, g *synthGuest) effect {
			pfn, ok := g.findAllocated(rand.New(rand.NewPCG(1, 1)), zoneDMA32, 0)
			if !ok {
				t.Fatal("no allocated page")
			}
			g.linkBuddy(zoneDMA, pfn, 0, mtMovable)
			return distrustZone(zoneDMA, "outside the zone")
		}},
		{"block straddles the zone start", func(t *testing.T, g *synthGuest) effect {
			// Frame 0 is reserved, ZONE_DMA starts at 1.
			g.linkBuddy(zoneDMA, 0, 1, mtMovable)
			return distrustZone(zoneDMA, "outside the zone")
		}},
		{"block straddles the zone end", func(t *testing.T, g *synthGuest) effect {
			g.linkBuddy(zoneDMA, 0xffe, 2, mtMovable)
			return distrustZone(zoneDMA, "outside the zone")
		}},
		{"misaligned block", func(t *testing.T, g *synthGuest) effect {
			pfn, ok := g.findAllocated(rand.New(rand.NewPCG(2, 2)), z, 2)
			if !ok {
				t.Fatal("no allocated block")
			}
			g.linkBuddy(z, pfn+1, 1, mtMovable)
			return distrustZone(z, "misaligned")
		}},
		{"block linked on two lists", func(t *testing.T, g *synthGuest) effect {
			// The reclaimable list is walked after the movable one.
			b := g.list(z, 0, mtMovable)[1]
			g.put64(g.headPA(z, 0, mtReclaimable), g.nodeVA(b.pfn))
			g.put64(g.nrFreePA(z, 0), g.get64(g.nrFreePA(z, 0))+1)
			return distrustZone(z, "linked twice")
		}},
		{"block nested in a free block", func(t *testing.T, g *synthGuest) effect {
			// Aligned blocks nest or are disjoint, so this adds no frame.
			// The walk does not notice and counts the page twice; it
			// must not call more frames free.
			b := g.list(z, 3, mtUnmovable)[0]
			g.linkBuddy(z, b.pfn+1, 0, mtMovable)
			return effect{zone: -1, pcpZone: -1, subsetOnly: true}
		}},
		{"node_data entry twice", func(t *testing.T, g *synthGuest) effect {
			// Node 1 is node 0 again: its zones are walked twice.
			nd := g.symPA("node_data")
			g.put64(nd+8, g.get64(nd))
			return effect{zone: -1, pcpZone: -1, subsetOnly: true}
		}},
		{"zone span beyond guest RAM", func(t *testing.T, g *synthGuest) effect {
			g.put64(g.zone(z).pa+PAddr(g.l.zoneSpanned), 1<<40)
			return distrustZone(z, "outside guest RAM")
		}},
		{"zone start beyond guest RAM", func(t *testing.T, g *synthGuest) effect {
			g.put64(g.zone(z).pa+PAddr(g.l.zoneStartPFN), g.maxPFN)
			return distrustZone(z, "outside guest RAM")
		}},

		// Per-CPU lists: CPU 0 of DMA32 uses every list; P is its first.
		{"pcp lock held", func(t *testing.T, g *synthGuest) effect {
			g.put32(g.pcpPA(z, 1)+PAddr(g.l.pcpLock), 1)
			return skipPCP(z, "lock held", 1)
		}},
		{"pcp count too high", func(t *testing.T, g *synthGuest) effect {
			c := g.pcpPA(z, 0) + PAddr(g.l.pcpCount)
			g.put32(c, g.get32(c)+1)
			return skipPCP(z, "count says", 0)
		}},
		{"pcp count too low", func(t *testing.T, g *synthGuest) effect {
			c := g.pcpPA(z, 2) + PAddr(g.l.pcpCount)
			g.put32(c, g.get32(c)-1)
			return skipPCP(z, "count says", 2)
		}},
		{"pcp cycle", func(t *testing.T, g *synthGuest) effect {
			P := g.pcpList(z, 0, 0)
			g.setNext(P[2].pfn, g.nodeVA(P[0].pfn))
			return skipPCP(z, "cycle", 0)
		}},
		{"pcp prev does not point back", func(t *testing.T, g *synthGuest) effect {
			P := g.pcpList(z, 0, 1)
			g.setPrev(P[1].pfn, g.nodeVA(P[2].pfn))
			return skipPCP(z, "prev pointer", 0)
		}},
		{"pcp pointer outside guest RAM", func(t *testing.T, g *synthGuest) effect {
			P := g.pcpList(z, 0, 12) // the pageblock list
			g.setNext(P[0].pfn, g.pageOffsetBase+uint64(g.maxPFN+1)*PageSize)
			return skipPCP(z, "not a struct page", 0)
		}},
		{"pcp page marked PageBuddy", func(t *testing.T, g *synthGuest) effect {
			g.setPageType(g.pcpList(z, 0, 4)[1].pfn, g.l.buddyMapcount)
			return skipPCP(z, "marked PageBuddy", 0)
		}},
		{"pcp page of another zone", func(t *testing.T, g *synthGuest) effect {
			pfn, ok := g.findAllocated(rand.New(rand.NewPCG(3, 3)), zoneDMA, 0)
			if !ok {
				t.Fatal("no allocated page")
			}
			g.linkPCP(z, 3, 0, pfn)
			return skipPCP(z, "outside the zone", 3)
		}},
		{"pcp page misaligned for its list", func(t *testing.T, g *synthGuest) effect {
			pfn, ok := g.findAllocated(rand.New(rand.NewPCG(4, 4)), z, 3)
			if !ok {
				t.Fatal("no allocated block")
			}
			g.linkPCP(z, 1, 9, pfn+2) // list 9 holds order 3
			return skipPCP(z, "misaligned", 1)
		}},
		{"pcp page also on a buddy list", func(t *testing.T, g *synthGuest) effect {
			P := g.pcpList(z, 0, 0)
			g.setNext(P[len(P)-1].pfn, g.nodeVA(g.list(z, 0, mtMovable)[1].pfn))
			return skipPCP(z, "linked twice", 0)
		}},
		{"pcp list spliced into an LRU list", func(t *testing.T, g *synthGuest) effect {
			// A consistent splice: the LRU page points back. The walk
			// follows the LRU list of allocated pages, consistent all
			// along, until it leaves the zone or meets the lruvec head.
			P := g.pcpList(z, 0, 0)
			last := P[len(P)-1].pfn
			head := g.pa(g.lruHeads[0])
			first := (g.get64(head) - g.vmemmapBase) / g.l.pageSize
			g.setNext(last, g.get64(head))
			g.setPrev(first, g.nodeVA(last))
			return skipPCP(z, "not a struct page|outside the zone", 0)
		}},
		{"per_cpu_pageset NULL", func(t *testing.T, g *synthGuest) effect {
			// Each CPU's pcp is then the start of its per-CPU area,
			// other variables whose "lock" is not zero.
			g.put64(g.zone(z).pa+PAddr(g.l.zonePCP), 0)
			return skipPCP(z, "lock held", 0, 1, 2, 3)
		}},
		{"per_cpu_pageset garbage", func(t *testing.T, g *synthGuest) effect {
			g.put64(g.zone(z).pa+PAddr(g.l.zonePCP), 0x7fff00000000)
			e := skipPCP(z, "", 0, 1, 2, 3)
			e.errOK = true
			return e
		}},
		{"__per_cpu_offset garbage", func(t *testing.T, g *synthGuest) effect {
			g.put64(g.symPA("__per_cpu_offset")+8, 0x1234)
			e := skipPCP(allZones, "", 1)
			e.errOK = true
			return e
		}},

		// Kernel variables.
		{"node_data garbage", func(t *testing.T, g *synthGuest) effect {
			g.put64(g.symPA("node_data"), 0xffffc90000000000)
			return effect{zone: -1, pcpZone: -1, errOK: true}
		}},
		{"nr_cpu_ids zero", func(t *testing.T, g *synthGuest) effect {
			g.put32(g.symPA("nr_cpu_ids"), 0)
			return effect{err: ErrKernel}
		}},
		{"nr_cpu_ids huge", func(t *testing.T, g *synthGuest) effect {
			g.put32(g.symPA("nr_cpu_ids"), 0xffffffff)
			return effect{err: ErrKernel}
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			forBothModes(t, func(t *testing.T, la57 bool) {
				g := newSmallGuest(t, la57, 7)
				clean := g.free.Clone()
				eff := tt.corrupt(t, g)
				res, err := g.walk(t)
				checkEffect(t, g, clean, res, err, eff)
			})
		})
	}
}

// TestWalkFreeGarbageZone overwrites one zone struct with random bytes: the
// walk must not panic and must call no frame of that zone free.
func TestWalkFreeGarbageZone(t *testing.T) {
	forBothModes(t, func(t *testing.T, la57 bool) {
		for _, z := range []int{zoneDMA, zoneDMA32, zoneNormal} {
			for seed := range uint64(5) {
				t.Run(fmt.Sprintf("zone=%d/seed=%d", z, seed), func(t *testing.T) {
					g := newSmallGuest(t, la57, 11)
					clean := g.free.Clone()
					g.fillRandom(rand.New(rand.NewPCG(seed, uint64(z))), g.zone(z).pa, g.l.zoneSize)
					res, err := g.walk(t)
					if err != nil {
						t.Logf("walk failed, which is conservative: %v", err)
						return
					}
					checkSubset(t, res.Free, clean)
					span := g.zone(z).span
					if i, ok := res.Free.NextSet(span.start); ok && i < span.end {
						t.Errorf("pfn %#x of the garbage zone called free", i)
					}
				})
			}
		}
	})
}

// TestWalkFreeGarbageEverywhere overwrites everything the walk reads past
// the kernel variables with random bytes: node 0, every per-CPU area and the
// struct pages. Nothing may be called free.
func TestWalkFreeGarbageEverywhere(t *testing.T) {
	forBothModes(t, func(t *testing.T, la57 bool) {
		for seed := range uint64(4) {
			t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
				g := newSmallGuest(t, la57, 12)
				rng := rand.New(rand.NewPCG(seed, 99))
				g.fillRandom(rng, g.pgdat, g.p.Structs["pglist_data"].Size)
				for _, unit := range g.cpuUnit {
					g.fillRandom(rng, unit, synthPCPUnit)
				}
				for _, pa := range g.vmemmap {
					g.fillRandom(rng, pa, hugePage)
				}
				res, err := g.walk(t)
				if err != nil {
					t.Logf("walk failed, which is conservative: %v", err)
					return
				}
				if n := res.Free.Count(); n != 0 {
					t.Errorf("%d frames of garbage called free", n)
				}
			})
		}
	})
}

// TestWalkFreeGarbageStructPages keeps the zones and per-CPU lists but fills
// every struct page with random bytes.
func TestWalkFreeGarbageStructPages(t *testing.T) {
	forBothModes(t, func(t *testing.T, la57 bool) {
		g := newSmallGuest(t, la57, 13)
		rng := rand.New(rand.NewPCG(5, 5))
		for _, pa := range g.vmemmap {
			g.fillRandom(rng, pa, hugePage)
		}
		res, err := g.walk(t)
		if err != nil {
			t.Fatal(err)
		}
		if n := res.Free.Count(); n != 0 {
			t.Errorf("%d frames called free", n)
		}
		for _, rep := range res.Zones {
			if rep.Trusted {
				t.Errorf("zone %s trusted", rep.Name)
			}
		}
	})
}

func TestOpenKernelBanner(t *testing.T) {
	const otherBanner = "Linux version 6.1.0-48-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT_DYNAMIC Debian 6.1.171-1 (2026-06-01)"
	forBothModes(t, func(t *testing.T, la57 bool) {
		for _, pti := range []bool{false, true} {
			t.Run(fmt.Sprintf("pti=%v", pti), func(t *testing.T) {
				cfg := smallConfig(la57, 21)
				cfg.pti = pti
				p := realProfile(t)
				if k := newSynthGuest(t, p, cfg).kernel(); k.Slide == 0 {
					t.Log("KASLR slide 0")
				}
				for _, tt := range []struct {
					name               string
					mutate             func(g *synthGuest)
					kernel, profBanner string
				}{
					{"profile for another build", func(g *synthGuest) {
						q := *g.p
						q.Banner = otherBanner
						g.p = &q
					}, p.Banner, otherBanner},
					{"guest runs another build", func(g *synthGuest) {
						copy(g.ram[g.symPA("linux_banner"):], otherBanner+"\n\x00")
					}, otherBanner, p.Banner},
					{"guest's banner elsewhere", func(g *synthGuest) {
						// Another build keeps linux_banner at another
						// address: the profile's holds other data.
						copy(g.ram[g.symPA("linux_banner"):], "\x48\x89\xe5\x41\x57 not a banner\x00")
						copy(g.ram[g.imagePA(0)+0x1234:], otherBanner+"\n\x00")
					}, otherBanner, p.Banner},
					{"no banner to be found", func(g *synthGuest) {
						// The tail of some other string: not quoted
						// as if it were the guest's banner.
						copy(g.ram[g.symPA("linux_banner"):], "8)\n\x00")
					}, "unknown (no Linux banner at the profile's linux_banner address)", p.Banner},
				} {
					t.Run(tt.name, func(t *testing.T) {
						g := newSynthGuest(t, realProfile(t), cfg)
						tt.mutate(g)
						k, err := OpenKernel(g.mem, g.cr3, la57, g.p)
						if !errors.Is(err, profiles.ErrBannerMismatch) {
							t.Fatalf("OpenKernel = %v, %v; want an error wrapping ErrBannerMismatch", k, err)
						}
						var be *profiles.BannerMismatchError
						if !errors.As(err, &be) || be.Kernel != tt.kernel || be.Profile != tt.profBanner {
							t.Fatalf("error %v: want kernel banner %q and profile banner %q", err, tt.kernel, tt.profBanner)
						}
						if msg := err.Error(); !strings.Contains(msg, tt.kernel) || !strings.Contains(msg, tt.profBanner) {
							t.Errorf("error %q does not name both banners", msg)
						}
					})
				}
			})
		}
	})
}

// TestOpenKernelWrongMode opens a guest with the other paging mode.
func TestOpenKernelWrongMode(t *testing.T) {
	forBothModes(t, func(t *testing.T, la57 bool) {
		g := newSynthGuest(t, realProfile(t), smallConfig(la57, 22))
		if k, err := OpenKernel(g.mem, g.cr3, !la57, g.p); err == nil {
			t.Fatalf("OpenKernel with LA57=%v of a guest with LA57=%v = %+v, want an error", !la57, la57, k)
		}
	})
}

// TestWalkFreePolicy reads the free-page policy static keys.
func TestWalkFreePolicy(t *testing.T) {
	g := newSmallGuest(t, false, 23)
	g.put32(g.symPA("_page_poisoning_enabled"), 1)
	g.put32(g.symPA("init_on_free"), 1)
	res, err := g.walk(t)
	if err != nil {
		t.Fatal(err)
	}
	if !res.PagePoisoning || !res.InitOnFree || res.FillByte != pagePoison {
		t.Errorf("poisoning %v, init_on_free %v, fill %#x; want true, true, %#x", res.PagePoisoning, res.InitOnFree, res.FillByte, pagePoison)
	}
	if d := diffBitmaps(res.Free, g.free); d != "" {
		t.Errorf("free bitmap: %s", d)
	}
}

// TestWalkFreePossibleCPUs gives the guest a hole in cpu_possible_mask:
// the per-CPU lists of a CPU that is not possible are not walked.
func TestWalkFreePossibleCPUs(t *testing.T) {
	cfg := smallConfig(false, 24)
	cfg.possible = 0b1101
	g := newSynthGuest(t, realProfile(t), cfg)
	rng := rand.New(rand.NewPCG(24, 24))
	g.populate(rng, population{free: 0.24, split: 0.6, freeOrder0: 0.6, pcpPerCPU: 20})
	for range 10 {
		pfn, ok := g.findAllocated(rng, zoneDMA32, 0)
		if !ok {
			t.Fatal("no allocated page")
		}
		g.addPCP(zoneDMA32, 1, 0, pfn)
	}
	// CPU 2's lists are skipped too: their lock is held.
	g.put32(g.pcpPA(zoneDMA32, 2)+PAddr(g.l.pcpLock), 1)
	res, err := g.walk(t)
	if err != nil {
		t.Fatal(err)
	}
	checkSubset(t, res.Free, g.free)
	want := g.expect(func(b synthBlock) bool { return b.cpu == 1 || b.zone == zoneDMA32 && b.cpu == 2 })
	if d := diffBitmaps(res.Free, want); d != "" {
		t.Errorf("free bitmap: %s", d)
	}
	if w := strings.Join(res.Warnings, "\n"); !strings.Contains(w, "lock held") {
		t.Errorf("warnings %q", w)
	}
}

// TestWalkFreeTimeout gives the walk no time: it must fail with
// ErrScanTimeout rather than return a partial answer.
func TestWalkFreeTimeout(t *testing.T) {
	g := newSmallGuest(t, false, 25)
	k := g.kernel()
	_, err := k.WalkFree(context.Background(), WalkOptions{Timeout: time.Nanosecond})
	if !errors.Is(err, ErrScanTimeout) {
		t.Fatalf("WalkFree with a 1 ns timeout: %v, want ErrScanTimeout", err)
	}
}

// TestPCPOrder checks the per-CPU list index to order mapping against
// mm/page_alloc.c order_to_pindex() of the profiled 6.1 kernel, whose
// stable backport has two pageblock-order (THP) lists.
func TestPCPOrder(t *testing.T) {
	p := realProfile(t)
	for name, want := range map[string]int64{
		"NR_PCP_LISTS": 14, "MIGRATE_PCPTYPES": 3, "PAGE_ALLOC_COSTLY_ORDER": 3, "PAGEBLOCK_ORDER": 9,
	} {
		if got := p.Constants[name]; got != want {
			t.Errorf("profile %s = %d, want %d", name, got, want)
		}
	}
	check := func(t *testing.T, l *layout, want []uint64) {
		t.Helper()
		for i, w := range want {
			if got, ok := l.pcpOrder(uint64(i)); !ok || got != w {
				t.Errorf("pcpOrder(%d) = %d, %v; want %d", i, got, ok, w)
			}
		}
		for _, i := range []uint64{uint64(len(want)), uint64(len(want)) + 1, 1 << 40} {
			if got, ok := l.pcpOrder(i); ok {
				t.Errorf("pcpOrder(%d) = %d, true; want no such list", i, got)
			}
		}
	}
	l, err := resolveLayout(p)
	if err != nil {
		t.Fatal(err)
	}
	check(t, l, []uint64{0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 9, 9})
	// 6.1 as released had one THP list (NR_PCP_THP 1).
	p.Constants["NR_PCP_LISTS"] = 13
	pcp := p.Structs["per_cpu_pages"]
	f := pcp.Fields["lists"]
	f.Count, f.Size = 13, 13*16
	pcp.Fields["lists"] = f
	p.Structs["per_cpu_pages"] = pcp
	if l, err = resolveLayout(p); err != nil {
		t.Fatal(err)
	}
	check(t, l, []uint64{0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 9})
	// Without THP, no list past the low orders.
	p.Constants["NR_PCP_LISTS"] = 12
	if l, err = resolveLayout(p); err != nil {
		t.Fatal(err)
	}
	check(t, l, []uint64{0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3})
}

// Fuzzing the walk. FuzzWalkFree overwrites a window of a clean synthetic
// guest's memory and walks it. An input is one region byte, a 3-byte
// little-endian offset into the region (taken modulo its size) and the
// bytes to write there (cut to the region's window limit):
//
//	go test ./introspect -run '^$' -fuzz FuzzWalkFree -fuzztime 5m
//
// The seeds in testdata/fuzz/FuzzWalkFree are written by
//
//	go test ./introspect -run TestFuzzWalkFreeSeeds -update-fuzz-seeds
//
// What the walk may answer depends on what the window hits:
//
//   - zones (the struct zones of node 0) and pcp (every CPU's
//     per_cpu_pages): nothing beyond the clean free frames. A list head or
//     counter can only make a list fail its checks: the first struct page
//     of a list must point back at the head, and struct pages are clean, so
//     the only list that passes from a head is its clean list. Moving a
//     per-CPU base (per_cpu_pageset) by a multiple of 16 bytes could make a
//     list be read as another of higher order, but the lock and count words
//     then come from other lists' pointers or the per-CPU pattern, which are
//     never a free lock and the right count.
//   - pages (struct pages; windows of at most 64 bytes, so at most two
//     struct pages): a touched struct page can be made to look free, and a
//     block headed by it can be called free; a clean struct page can only
//     be reached through its own clean predecessor, so no other frame can.
//     Free frames outside the clean ones must lie within a maximal block
//     from a touched struct page.
//   - globals (node_data, nr_cpu_ids, cpu_possible_mask, __per_cpu_offset):
//     these move whole structures, and only the weak property is checked.
//
// Always: no panic, no timeout, and every free frame inside a trusted zone's
// span.

var updateFuzzSeeds = flag.Bool("update-fuzz-seeds", false, "rewrite testdata/fuzz/FuzzWalkFree")

// fuzzRegion is a part of guest memory the fuzzer overwrites: parts laid
// end to end.
type fuzzRegion struct {
	name   string
	parts  []PAddrRange
	window int
}

const (
	regionZones = iota
	regionPages
	regionPCP
	regionGlobals
	numRegions
)

type fuzzTarget struct {
	g       *synthGuest
	clean   *pagemap.Bitmap
	regions [numRegions]fuzzRegion
}

var (
	fuzzOnce sync.Once
	fuzzT    *fuzzTarget
)

// theFuzzTarget builds the guest FuzzWalkFree mutates, once per process.
func theFuzzTarget(tb testing.TB) *fuzzTarget {
	fuzzOnce.Do(func() {
		g := newSmallGuest(tb, false, 31)
		f := &fuzzTarget{g: g, clean: g.free.Clone()}
		zones := g.zone(zoneDMA).pa
		f.regions[regionZones] = fuzzRegion{"zones", []PAddrRange{{zones, g.zone(zoneNormal).pa + PAddr(g.l.zoneSize)}}, 256}
		f.regions[regionPages] = fuzzRegion{"pages", []PAddrRange{
			{g.pagePA(0), g.pagePA(0x4000-1) + PAddr(g.l.pageSize)},
			{g.pagePA(0x100000), g.pagePA(0x101000-1) + PAddr(g.l.pageSize)},
		}, 64}
		var pcp []PAddrRange
		for cpu := range g.cfg.cpus {
			pcp = append(pcp, PAddrRange{g.pcpPA(zoneDMA, cpu), g.pcpPA(zoneNormal+1, cpu)})
		}
		f.regions[regionPCP] = fuzzRegion{"pcp", pcp, 256}
		nodeData := g.symPA("node_data")
		offs := g.symPA("__per_cpu_offset")
		f.regions[regionGlobals] = fuzzRegion{"globals", []PAddrRange{
			{nodeData, nodeData + 16},
			{g.symPA("nr_cpu_ids"), g.symPA("nr_cpu_ids") + 4},
			{g.symPA("__cpu_possible_mask"), g.symPA("__cpu_possible_mask") + 8},
			{offs, offs + PAddr(8*g.cfg.cpus)},
		}, 16}
		fuzzT = f
	})
	if fuzzT == nil {
		tb.Fatal("fuzz target not built")
	}
	return fuzzT
}

// window resolves an input to the guest memory it overwrites.
func (f *fuzzTarget) window(data []byte) (region int, at PAddr, payload []byte, ok bool) {
	if len(data) < 4 {
		return 0, 0, nil, false
	}
	region = int(data[0]) % numRegions
	r := f.regions[region]
	var size uint64
	for _, p := range r.parts {
		size += p.Length()
	}
	off := uint64(data[1]) | uint64(data[2])<<8 | uint64(data[3])<<16
	off %= size
	payload = data[4:]
	for _, p := range r.parts {
		if off < p.Length() {
			at = p.Start + PAddr(off)
			n := min(len(payload), r.window, int(p.Length()-off))
			return region, at, payload[:n], true
		}
		off -= p.Length()
	}
	panic("unreachable")
}

// fuzzInput encodes an input that writes payload at pa, in region.
func (f *fuzzTarget) input(tb testing.TB, region int, pa PAddr, payload []byte) []byte {
	tb.Helper()
	var off uint64
	for _, p := range f.regions[region].parts {
		if p.Contains(pa) {
			off += uint64(pa - p.Start)
			if len(payload) > f.regions[region].window || uint64(pa)+uint64(len(payload)) > uint64(p.End) {
				tb.Fatalf("seed of %d bytes at %v does not fit region %s", len(payload), pa, f.regions[region].name)
			}
			return append([]byte{byte(region), byte(off), byte(off >> 8), byte(off >> 16)}, payload...)
		}
		off += p.Length()
	}
	tb.Fatalf("%v is not in region %s", pa, f.regions[region].name)
	return nil
}

func le64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }
func le32(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }

// fuzzSeeds are the seed inputs: one interesting damage in each region.
func (f *fuzzTarget) seeds(tb testing.TB) map[string][]byte {
	g := f.g
	L := g.list(zoneDMA32, 0, mtMovable)
	L3 := g.list(zoneDMA32, 3, mtUnmovable)
	P := g.pcpList(zoneDMA32, 0, 0)
	alloc, ok := g.findAllocated(rand.New(rand.NewPCG(31, 31)), zoneDMA32, 3)
	if !ok {
		tb.Fatal("no allocated block")
	}
	z := g.zone(zoneDMA32).pa
	pcpSize := g.p.Structs["per_cpu_pages"].Size
	return map[string][]byte{
		"noop":               f.input(tb, regionZones, g.headPA(zoneDMA32, 0, mtMovable), le64(g.get64(g.headPA(zoneDMA32, 0, mtMovable)))),
		"zone-lock":          f.input(tb, regionZones, z+PAddr(g.l.zoneLock), le32(1)),
		"zone-nr-free":       f.input(tb, regionZones, g.nrFreePA(zoneDMA32, 3), le64(g.get64(g.nrFreePA(zoneDMA32, 3))+1)),
		"zone-head-second":   f.input(tb, regionZones, g.headPA(zoneDMA32, 0, mtMovable), le64(g.nodeVA(L[1].pfn))),
		"zone-counter":       f.input(tb, regionZones, g.counterPA(zoneDMA32), le64(1<<40)),
		"zone-span":          f.input(tb, regionZones, z+PAddr(g.l.zoneSpanned), le64(1<<40)),
		"zone-pcp-shift":     f.input(tb, regionZones, z+PAddr(g.l.zonePCP), le64(g.get64(z+PAddr(g.l.zonePCP))-12*16)),
		"zone-pcp-next-zone": f.input(tb, regionZones, z+PAddr(g.l.zonePCP), le64(g.get64(z+PAddr(g.l.zonePCP))+pcpSize)),
		"page-not-buddy":     f.input(tb, regionPages, g.pagePA(L3[1].pfn)+PAddr(g.l.pageType), le32(0xffffffff)),
		"page-order":         f.input(tb, regionPages, g.pagePA(L3[1].pfn)+PAddr(g.l.pagePrivate), le64(4)),
		"page-cycle":         f.input(tb, regionPages, g.nodePA(L[2].pfn), le64(g.nodeVA(L[0].pfn))),
		"page-looks-free": f.input(tb, regionPages, g.pagePA(alloc)+PAddr(g.l.pageList), append(append(append(
			le64(g.get64(g.nodePA(alloc))), le64(g.get64(g.nodePA(alloc)+8))...), make([]byte, g.l.pagePrivate-g.l.pageList-16)...),
			append(le64(3), le32(g.l.buddyMapcount)...)...)),
		"pcp-lock":      f.input(tb, regionPCP, g.pcpPA(zoneDMA32, 1)+PAddr(g.l.pcpLock), le32(1)),
		"pcp-count":     f.input(tb, regionPCP, g.pcpPA(zoneDMA32, 0)+PAddr(g.l.pcpCount), le32(g.get32(g.pcpPA(zoneDMA32, 0)+PAddr(g.l.pcpCount))+1)),
		"pcp-head":      f.input(tb, regionPCP, g.pcpHeadPA(zoneDMA32, 0, 0), le64(g.nodeVA(P[1].pfn))),
		"pcp-list-swap": f.input(tb, regionPCP, g.pcpHeadPA(zoneDMA32, 0, 0), append(le64(g.get64(g.pcpHeadPA(zoneDMA32, 0, 9))), le64(g.get64(g.pcpHeadPA(zoneDMA32, 0, 9)+8))...)),
		"nr-cpu-ids":    f.input(tb, regionGlobals, g.symPA("nr_cpu_ids"), le32(0)),
		"node-data":     f.input(tb, regionGlobals, g.symPA("node_data"), le64(g.directVA(g.pgdat)+g.l.zoneSize)),
		"cpu-offset":    f.input(tb, regionGlobals, g.symPA("__per_cpu_offset")+8, le64(g.get64(g.symPA("__per_cpu_offset")+8)-12*16)),
		"possible-mask": f.input(tb, regionGlobals, g.symPA("__cpu_possible_mask"), le64(0b1010)),
	}
}

// TestFuzzWalkFreeSeeds runs the seeds through the fuzz check and, with
// -update-fuzz-seeds, writes them to testdata/fuzz/FuzzWalkFree.
func TestFuzzWalkFreeSeeds(t *testing.T) {
	f := theFuzzTarget(t)
	dir := filepath.Join("testdata", "fuzz", "FuzzWalkFree")
	for name, in := range f.seeds(t) {
		if *updateFuzzSeeds {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			body := "go test fuzz v1\n[]byte(" + strconv.Quote(string(in)) + ")\n"
			if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		t.Run(name, func(t *testing.T) { f.check(t, in) })
	}
}

func FuzzWalkFree(f *testing.F) {
	ft := theFuzzTarget(f)
	f.Fuzz(func(t *testing.T, data []byte) { ft.check(t, data) })
}

// check applies one input, walks, checks, and puts the memory back.
func (f *fuzzTarget) check(t *testing.T, data []byte) {
	region, at, payload, ok := f.window(data)
	if !ok {
		return
	}
	g := f.g
	g.tb = t // inputs run one at a time in a process
	saved := bytes.Clone(g.ram[at : at+PAddr(len(payload))])
	defer copy(g.ram[at:], saved)
	noop := bytes.Equal(saved, payload)
	copy(g.ram[at:], payload)

	k, err := OpenKernel(g.mem, g.cr3, g.cfg.la57, g.p)
	if err != nil {
		t.Fatalf("OpenKernel: %v", err) // the regions hold nothing it reads
	}
	start := time.Now()
	res, err := k.WalkFree(context.Background(), WalkOptions{Timeout: 2 * time.Second})
	if d := time.Since(start); d > time.Second || errors.Is(err, ErrScanTimeout) {
		t.Fatalf("walk took %v: %v", d, err)
	}
	if err != nil {
		if noop {
			t.Fatalf("walk of the clean guest: %v", err)
		}
		return
	}
	// Every free frame lies in a trusted zone.
	for start, n := range res.Free.Runs() {
		for pfn, end := start, start+n; pfn < end; {
			var in *ZoneReport
			for i := range res.Zones {
				z := &res.Zones[i]
				if z.Trusted && pfn >= z.StartPFN && pfn-z.StartPFN < z.Spanned {
					in = z
				}
			}
			if in == nil {
				t.Fatalf("pfn %#x called free outside every trusted zone (%+v)", pfn, res.Zones)
			}
			pfn = min(end, in.StartPFN+in.Spanned)
		}
	}
	if res.Pages() < res.Free.Count() {
		t.Errorf("counted %d free pages, bitmap has %d", res.Pages(), res.Free.Count())
	}
	extra := res.Free.Clone()
	extra.AndNot(f.clean)
	switch region {
	case regionZones, regionPCP:
		if n := extra.Count(); n > 0 {
			first, _ := extra.NextSet(0)
			t.Fatalf("%s: %d frames called free that are not (first %#x)", f.regions[region].name, n, first)
		}
	case regionPages:
		// Frames whose struct pages the window touched.
		var lo, hi uint64
		if len(payload) > 0 {
			lo, hi = g.pfnOfStructPage(at), g.pfnOfStructPage(at+PAddr(len(payload)-1))
		}
		maxBlock := uint64(1) << max(g.l.maxOrder-1, g.l.pageblockOrder)
		for q := range extra.All() {
			if len(payload) == 0 || q < lo || q >= hi+maxBlock {
				t.Fatalf("pages: pfn %#x called free, not free in the clean guest nor in a block of a touched struct page [%#x, %#x]", q, lo, hi)
			}
		}
	}
	if noop {
		if d := diffBitmaps(res.Free, f.clean); d != "" || len(res.Warnings) > 0 {
			t.Fatalf("clean guest: %s %q", d, res.Warnings)
		}
	}
}

// TestWalkFreeSparse walks the benchmark's 3 GiB guest, of which only
// 96 MiB are backed: RAM on both sides of the PCI hole, ZONE_DMA32 spanning
// the hole, ZONE_NORMAL above 4 GiB.
func TestWalkFreeSparse(t *testing.T) {
	g := newSynthGuest(t, realProfile(t), bigConfig(false, 2))
	if got, want := g.mem.Size(), uint64(3<<30); got != want {
		t.Fatalf("guest RAM %#x bytes, want %#x", got, want)
	}
	res, err := g.walk(t)
	if err != nil {
		t.Fatal(err)
	}
	if res.Free.Count() != 0 || len(res.Warnings) != 1 || !strings.Contains(res.Warnings[0], "no free page") {
		t.Errorf("empty free lists: %d free, warnings %q", res.Free.Count(), res.Warnings)
	}
	g.addBuddy(zoneDMA32, 0x7fc00, 10, mtMovable) // just below the hole
	g.addBuddy(zoneNormal, 0x13ffff, 0, mtReclaimable)
	g.addBuddy(zoneNormal, 0x100000, 9, mtHighAtomic)
	g.addPCP(zoneNormal, 3, 13, 0x120000)
	g.addPCP(zoneDMA, 0, 5, 0x2)
	res, err = g.walk(t)
	if err != nil {
		t.Fatal(err)
	}
	checkClean(t, g, res)
}

// BenchmarkWalkFree walks a 3 GiB guest (786432 frames: 2 GiB below the PCI
// hole, 1 GiB above 4 GiB) whose RAM is sparse: only the 96 MiB holding
// kernel data, the vmemmap and the page tables are backed. "mixed" is a
// guest that has run for a while (60% free, in blocks of every order);
// "fragmented" the worst case (60% free, every free page its own block).
// Each op opens the kernel afresh, so translation caches start cold.
func BenchmarkWalkFree(b *testing.B) {
	for _, bb := range []struct {
		name string
		pop  population
		la57 bool
	}{
		{"mixed", mixed, false},
		{"mixed/la57", mixed, true},
		{"fragmented", fragmented, false},
	} {
		b.Run(bb.name, func(b *testing.B) {
			g := newSynthGuest(b, realProfile(b), bigConfig(bb.la57, 1))
			g.populate(rand.New(rand.NewPCG(1, 2)), bb.pop)
			var blocks, pcp int
			for _, bl := range g.blocks {
				blocks++
				if bl.pcp() {
					pcp += 1 << bl.order
				}
			}
			b.SetBytes(int64(g.ramBytes))
			b.ReportAllocs()
			var res *FreePages
			for b.Loop() {
				k, err := OpenKernel(g.mem, g.cr3, bb.la57, g.p)
				if err != nil {
					b.Fatal(err)
				}
				if res, err = k.WalkFree(context.Background(), WalkOptions{}); err != nil {
					b.Fatal(err)
				}
			}
			if d := diffBitmaps(res.Free, g.free); d != "" {
				b.Fatalf("free bitmap: %s", d)
			}
			b.ReportMetric(float64(blocks), "blocks")
			b.ReportMetric(float64(g.free.Count())/float64(g.ramBytes/PageSize)*100, "%free")
			b.ReportMetric(float64(pcp), "pcp-pages")
		})
	}
}
