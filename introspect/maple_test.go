package introspect

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// synthVMA is a VMA for [buildMaple].
type synthVMA struct{ start, end, flags uint64 }

// mapleBuilder writes maple nodes and VMAs into a synthetic guest.
type mapleBuilder struct {
	t testing.TB
	g *synthGuest
	l *mapleLayout
}

func (b *mapleBuilder) vma(v synthVMA) uint64 {
	pa := b.g.alloc(b.g.p.Structs["vm_area_struct"].Size, 64)
	b.g.put64(pa+PAddr(b.l.vmStart), v.start)
	b.g.put64(pa+PAddr(b.l.vmEnd), v.end)
	b.g.put64(pa+PAddr(b.l.vmFlags), v.flags)
	return b.g.directVA(pa)
}

// leaf writes a maple_leaf_64 node with the given VMAs (and NULL slots
// for the gaps) covering [min, max], and returns its encoded pointer.
func (b *mapleBuilder) leaf(min, max uint64, vmas []synthVMA) uint64 {
	type slot struct{ hi, entry uint64 }
	var slots []slot
	at := min
	for _, v := range vmas {
		if v.start > at {
			slots = append(slots, slot{v.start - 1, 0})
		}
		slots = append(slots, slot{v.end - 1, b.vma(v)})
		at = v.end
	}
	if at-1 != max {
		slots = append(slots, slot{max, 0})
	}
	require.LessOrEqual(b.t, len(slots), int(b.l.r64Slots))
	return b.node(mapleLeaf64, slots, func(i int) (uint64, uint64) { return slots[i].hi, slots[i].entry }, len(slots))
}

func (b *mapleBuilder) node(typ uint64, _ any, slot func(int) (hi, entry uint64), n int) uint64 {
	pa := b.g.alloc(mapleNodeSize, mapleNodeSize)
	clear(b.g.ram[pa : pa+mapleNodeSize])
	b.g.put64(pa, (b.g.directVA(pa)+mapleNodeSize)|1) // parent: a root points at its tree, | 1; never at itself
	pivot, slots, meta, npivots := b.l.r64Pivot, b.l.r64Slot, b.l.r64MetaEnd, b.l.r64Pivots
	if typ == mapleArange64 {
		pivot, slots, meta, npivots = b.l.a64Pivot, b.l.a64Slot, b.l.a64MetaEnd, b.l.a64Pivots
	}
	for i := range n {
		hi, e := slot(i)
		if uint64(i) < npivots {
			b.g.put64(pa+PAddr(pivot)+PAddr(8*i), hi)
		}
		b.g.put64(pa+PAddr(slots)+PAddr(8*i), e)
	}
	b.g.ram[pa+PAddr(meta)] = byte(n - 1)
	return b.g.directVA(pa) | typ<<mapleTypeShift | mapleEnodeNull
}

// mm makes an mm_struct whose tree's root is root, with map_count n.
func (b *mapleBuilder) mm(root uint64, n uint32) VAddr {
	pa := b.g.alloc(b.g.p.Structs["mm_struct"].Size, 64)
	clear(b.g.ram[pa : uint64(pa)+b.g.p.Structs["mm_struct"].Size])
	if root != 0 {
		root |= mapleRootNode // mte_mk_root
	}
	b.g.put64(pa+PAddr(b.l.mmTree+b.l.treeRoot), root)
	b.g.put32(pa+PAddr(b.l.mmMapCount), n)
	return VAddr(b.g.directVA(pa))
}

// twoLevels writes an arange_64 root over two leaves split at 1 TiB,
// holding testVMAs, and returns the root and the left leaf.
func (b *mapleBuilder) twoLevels() (root, left uint64) {
	const max = ^uint64(0)
	split := uint64(1<<40) - 1
	left = b.leaf(0, split, testVMAs[:2])
	right := b.leaf(split+1, max, testVMAs[2:])
	root = b.node(mapleArange64, nil, func(i int) (uint64, uint64) {
		return [2]uint64{split, max}[i], [2]uint64{left, right}[i]
	}, 2)
	return root, left
}

var testVMAs = []synthVMA{
	{0x400000, 0x402000, 0x875}, {0x402000, 0x500000, 0x873},
	{0x7f0000000000, 0x7f0000021000, 0x73}, {0x7ffd00000000, 0x7ffd00021000, 0x100173},
}

func TestVMAs(t *testing.T) {
	g := newSynthGuest(t, realProfile(t), smallConfig(false, 13))
	l, err := resolveMapleLayout(g.p)
	require.NoError(t, err)
	b := &mapleBuilder{t: t, g: g, l: l}
	const max = ^uint64(0)

	// One leaf.
	one := b.mm(b.leaf(0, max, testVMAs), 4)
	root, left := b.twoLevels()
	two := b.mm(root, 4)
	empty := b.mm(0, 0)
	k := g.kernel()
	for name, mm := range map[string]VAddr{"leaf": one, "two levels": two} {
		vmas, err := k.VMAs(mm)
		require.NoError(t, err, name)
		require.Len(t, vmas, 4, name)
		for i, v := range vmas {
			assert.Equal(t, testVMAs[i].start, v.Start, name)
			assert.Equal(t, testVMAs[i].end, v.End, name)
			assert.Equal(t, testVMAs[i].flags, v.Flags, name)
		}
	}
	vmas, err := k.VMAs(empty)
	require.NoError(t, err)
	assert.Empty(t, vmas)

	// Hostile trees: each an error, never a guessed list.
	bad := func(name string, mm VAddr, want string) {
		t.Helper()
		_, err := g.kernel().VMAs(mm)
		require.Error(t, err, name)
		assert.True(t, errors.Is(err, ErrKernel), "%s: %v", name, err)
		assert.Contains(t, err.Error(), want, name)
	}
	bad("map_count off", b.mm(b.leaf(0, max, testVMAs), 5), "map_count 5")
	// A VMA whose range is not its slot's.
	wrong := b.leaf(0, max, testVMAs)
	vma := g.get64(g.pa((wrong &^ mapleNodeMask) + l.r64Slot + 8)) // slot 1: the first VMA
	g.put64(g.pa(vma+l.vmStart), 0x401000)
	bad("VMA outside its slot", b.mm(wrong, 4), "its slot")
	// A dead node: parent points to itself.
	dead := b.leaf(0, max, testVMAs)
	g.put64(g.pa(dead&^mapleNodeMask), dead&^mapleNodeMask)
	bad("dead node", b.mm(dead, 4), "dead")
	// A node of an unknown type, and a loop back to the root.
	bad("dense node", b.mm(left&^(mapleTypeMask<<mapleTypeShift), 4), "type 0")
	loop := b.node(mapleArange64, nil, func(i int) (uint64, uint64) { return max, 0 }, 1)
	g.put64(g.pa((loop&^mapleNodeMask)+l.a64Slot), loop)
	bad("loop", b.mm(loop, 4), "deeper than")
	// Pivots that go backwards.
	back := b.leaf(0, max, testVMAs)
	g.put64(g.pa((back&^mapleNodeMask)+l.r64Pivot+8), 0x100)
	bad("pivots backwards", b.mm(back, 4), "outside")
}

// FuzzVMAs overwrites bytes of a two-level maple tree and its VMAs: the
// walk ends with a list or an error, never a panic or a hang.
func FuzzVMAs(f *testing.F) {
	f.Add(uint16(0), []byte{0xff})
	f.Add(uint16(0x108), []byte{0x12, 0, 0, 0, 0, 0, 0, 0})
	g := newSynthGuest(f, realProfile(f), smallConfig(false, 17))
	l, err := resolveMapleLayout(g.p)
	if err != nil {
		f.Fatal(err)
	}
	b := &mapleBuilder{t: f, g: g, l: l}
	start := g.bump
	root, _ := b.twoLevels()
	mm := b.mm(root, 4)
	end := g.bump
	f.Fuzz(func(t *testing.T, off uint16, data []byte) {
		span := uint64(end - start)
		if len(data) > 64 || span == 0 {
			return
		}
		at := start + PAddr(uint64(off)%span)
		n := min(len(data), int(end-at))
		saved := append([]byte(nil), g.ram[at:at+PAddr(n)]...)
		copy(g.ram[at:], data[:n])
		defer copy(g.ram[at:], saved)
		k, err := OpenKernel(g.mem, g.cr3, false, g.p)
		if err != nil {
			return
		}
		_, _ = k.VMAs(mm)
	})
}
