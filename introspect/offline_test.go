package introspect

import (
	"context"
	"maps"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestOfflinePages marks pages the way a virtio balloon leaves them
// (page_type PAGE_OFFLINE_MAPCOUNT_VALUE) and finds exactly those: not a
// free page, however marked, and nothing in a zone the walk distrusts.
func TestOfflinePages(t *testing.T) {
	g := newSmallGuest(t, false, 2)
	k := g.kernel()
	l := k.layout
	offline := uint32(int32(k.Profile.Constants["PAGE_OFFLINE_MAPCOUNT_VALUE"]))
	require.Equal(t, uint32(0xfffffeff), offline, "~PG_offline in 6.1")
	var want []uint64
	for pfn := uint64(0x1000); len(want) < 40 && pfn < g.maxPFN; pfn += 7 {
		if g.free.Test(pfn) || !g.inRAM(pfn, 1) || g.isReserved(pfn, 1) {
			continue
		}
		g.put32(g.pagePA(pfn)+PAddr(l.pageType), offline)
		want = append(want, pfn)
	}
	require.Len(t, want, 40)
	res, err := k.WalkFree(context.Background(), walkOpts)
	require.NoError(t, err)
	got, n, err := k.OfflinePages(context.Background(), res)
	require.NoError(t, err)
	assert.Equal(t, uint64(len(want)), n)
	assert.Equal(t, want, slices.Collect(got.All()))

	// A profile without the constant cannot tell: an error, not a guess.
	p := *k.Profile
	p.Constants = maps.Clone(p.Constants)
	delete(p.Constants, "PAGE_OFFLINE_MAPCOUNT_VALUE")
	k2 := *k
	k2.Profile = &p
	_, _, err = k2.OfflinePages(context.Background(), res)
	assert.ErrorIs(t, err, ErrProfile)

	// Nothing is taken from a zone the walk does not trust.
	for i := range res.Zones {
		res.Zones[i].Trusted = false
	}
	_, n, err = k.OfflinePages(context.Background(), res)
	require.NoError(t, err)
	assert.Zero(t, n)
}
