package introspect

import (
	"encoding/binary"
	"fmt"

	"github.com/kvmckpt/kvmckpt/profiles"
)

// VMA is one memory area of a process (struct vm_area_struct).
type VMA struct {
	Start, End uint64 // [Start, End)
	Flags      uint64 // vm_flags
	PgOff      uint64 // offset in the file, in pages
	File       VAddr  // struct file, 0 for anonymous memory
	Addr       VAddr  // the vm_area_struct
}

// The maple tree's encoding (lib/maple_tree.c, include/linux/maple_tree.h
// of 6.1; unchanged in 6.12): macros, checked by what they imply (every
// VMA found where its range says, as many as map_count).
const (
	mapleNodeMask      = 0xff // nodes are 256-byte aligned
	mapleRootNode      = 0x02 // MAPLE_ROOT_NODE: ma_root holds a node
	mapleEnodeNull     = 0x04 // MAPLE_ENODE_NULL: a NULL somewhere below
	mapleTypeShift     = 3
	mapleTypeMask      = 0x0f
	mapleLeaf64        = 1
	mapleRange64       = 2
	mapleArange64      = 3
	mapleNodeSize      = 256
	maxMapleHeight     = 31 // MAPLE_HEIGHT_MAX
	maxVMAs            = 1 << 20
	maxMapleNodeVisits = 2*maxVMAs + 64
)

// mapleLayout is what the VMA walk needs from a profile.
type mapleLayout struct {
	mmTree, mmMapCount            uint64
	treeRoot                      uint64
	r64Pivot, r64Slot, r64MetaEnd uint64
	r64Pivots, r64Slots           uint64
	a64Pivot, a64Slot, a64MetaEnd uint64
	a64Pivots, a64Slots           uint64
	vmStart, vmEnd, vmFlags       uint64
	vmPgoff, vmFile               uint64
}

func resolveMapleLayout(p *profiles.Profile) (*mapleLayout, error) {
	var missing []string
	field := func(st, f string, width uint64) uint64 { return fieldOffset(p, &missing, st, f, width) }
	count := func(st, f string) uint64 {
		if fl, ok := p.Structs[st].Fields[f]; ok {
			return fl.Count
		}
		return 0
	}
	l := &mapleLayout{}
	l.mmTree = field("mm_struct", "mm_mt", 16)
	l.mmMapCount = field("mm_struct", "map_count", 4)
	l.treeRoot = field("maple_tree", "ma_root", 8)
	l.r64Pivot = field("maple_range_64", "pivot", 8)
	l.r64Slot = field("maple_range_64", "slot", 8)
	l.r64MetaEnd = field("maple_range_64", "meta", 1)
	l.r64Pivots, l.r64Slots = count("maple_range_64", "pivot"), count("maple_range_64", "slot")
	l.a64Pivot = field("maple_arange_64", "pivot", 8)
	l.a64Slot = field("maple_arange_64", "slot", 8)
	l.a64MetaEnd = field("maple_arange_64", "meta", 1)
	l.a64Pivots, l.a64Slots = count("maple_arange_64", "pivot"), count("maple_arange_64", "slot")
	l.vmStart = field("vm_area_struct", "vm_start", 8)
	l.vmEnd = field("vm_area_struct", "vm_end", 8)
	l.vmFlags = field("vm_area_struct", "vm_flags", 8)
	l.vmPgoff = field("vm_area_struct", "vm_pgoff", 8)
	l.vmFile = field("vm_area_struct", "vm_file", 8)
	for _, n := range []struct {
		pivots, slots, pivot, slot uint64
	}{{l.r64Pivots, l.r64Slots, l.r64Pivot, l.r64Slot}, {l.a64Pivots, l.a64Slots, l.a64Pivot, l.a64Slot}} {
		if n.slots != n.pivots+1 || n.slots > 32 || n.pivot+8*n.pivots > mapleNodeSize || n.slot+8*n.slots > mapleNodeSize {
			missing = append(missing, fmt.Sprintf("maple node of %d pivots and %d slots", n.pivots, n.slots))
		}
	}
	if l.r64MetaEnd >= mapleNodeSize || l.a64MetaEnd >= mapleNodeSize {
		missing = append(missing, "maple node metadata")
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("%w: the profile lacks what VMAs are read with (%v); a profile built before kvmckpt read them: remove it to have it rebuilt", ErrProfile, missing)
	}
	return l, nil
}

// VMAs returns the memory areas of the mm_struct at mm, in address
// order, from its maple tree. The walk is bounded and checked: every
// node must be a live node of a known type with increasing pivots inside
// its parent's range, every VMA must span exactly the range its slot
// says (the tree stores [vm_start, vm_end-1]), and their number must be
// the mm's map_count. Anything else is an error wrapping [ErrKernel].
func (k *Kernel) VMAs(mm VAddr) ([]VMA, error) {
	l, err := resolveMapleLayout(k.Profile)
	if err != nil {
		return nil, err
	}
	count, err := k.Uint32(mm + VAddr(l.mmMapCount))
	if err != nil {
		return nil, fmt.Errorf("%w: mm at %#x: %w", ErrKernel, uint64(mm), err)
	}
	if count > maxVMAs {
		return nil, fmt.Errorf("%w: mm at %#x: map_count %d", ErrKernel, uint64(mm), count)
	}
	root, err := k.Uint64(mm + VAddr(l.mmTree+l.treeRoot))
	if err != nil {
		return nil, fmt.Errorf("%w: mm at %#x: %w", ErrKernel, uint64(mm), err)
	}
	w := &mapleWalk{k: k, l: l, buf: make([]byte, mapleNodeSize)}
	switch {
	case root == 0:
	case root&3 != mapleRootNode || root < 4096:
		// A tree of one entry at index 0 holds no VMA.
		return nil, fmt.Errorf("%w: mm at %#x: maple root %#x is no node", ErrKernel, uint64(mm), root)
	default:
		if err := w.node(root, 0, ^uint64(0), 0); err != nil {
			return nil, fmt.Errorf("%w: mm at %#x: %w", ErrKernel, uint64(mm), err)
		}
	}
	if uint64(len(w.vmas)) != uint64(count) {
		return nil, fmt.Errorf("%w: mm at %#x: %d VMAs in its tree, map_count %d", ErrKernel, uint64(mm), len(w.vmas), count)
	}
	return w.vmas, nil
}

// isMapleChild reports whether a slot of an inner node can be an encoded
// node (mt_mk_node: the node's address, its type in bits 3-6, bit 2 a
// hint; bits 0 and 1 clear, unlike the root's).
func isMapleChild(e uint64) bool { return e&3 == 0 && e&^mapleNodeMask != 0 && e >= 1<<63 }

type mapleWalk struct {
	k      *Kernel
	l      *mapleLayout
	buf    []byte
	visits int
	vmas   []VMA
}

// node walks the subtree of the encoded node enode, which covers
// [min, max].
func (w *mapleWalk) node(enode, min, max uint64, depth int) error {
	if depth > maxMapleHeight {
		return fmt.Errorf("maple tree deeper than %d", maxMapleHeight)
	}
	if w.visits++; w.visits > maxMapleNodeVisits {
		return fmt.Errorf("more than %d maple nodes", maxMapleNodeVisits)
	}
	addr := VAddr(enode &^ mapleNodeMask)
	typ := (enode >> mapleTypeShift) & mapleTypeMask
	if err := w.k.ReadVirt(w.buf, addr); err != nil {
		return fmt.Errorf("maple node at %#x: %w", uint64(addr), err)
	}
	b := w.buf
	if parent := binary.LittleEndian.Uint64(b) &^ mapleNodeMask; parent == uint64(addr) {
		return fmt.Errorf("maple node at %#x is dead (freed under the walk)", uint64(addr))
	}
	var pivotOff, slotOff, npivots, end uint64
	switch typ {
	case mapleLeaf64, mapleRange64:
		pivotOff, slotOff, npivots = w.l.r64Pivot, w.l.r64Slot, w.l.r64Pivots
		// ma_data_end: the metadata unless the last pivot is in use.
		switch last := binary.LittleEndian.Uint64(b[pivotOff+8*(npivots-1):]); {
		case last == 0:
			end = uint64(b[w.l.r64MetaEnd])
		case last == max:
			end = npivots - 1
		default:
			end = npivots
		}
	case mapleArange64:
		pivotOff, slotOff, npivots = w.l.a64Pivot, w.l.a64Slot, w.l.a64Pivots
		end = uint64(b[w.l.a64MetaEnd])
	default:
		return fmt.Errorf("maple node at %#x of type %d", uint64(addr), typ)
	}
	if end > npivots {
		return fmt.Errorf("maple node at %#x ends at slot %d of %d", uint64(addr), end, npivots+1)
	}
	// Copy what is needed: the buffer is reused by the children.
	var pivots [32]uint64
	var slots [32]uint64
	for i := uint64(0); i <= end; i++ {
		if i < npivots {
			pivots[i] = binary.LittleEndian.Uint64(b[pivotOff+8*i:])
		}
		slots[i] = binary.LittleEndian.Uint64(b[slotOff+8*i:])
	}
	lo := min
	for i := uint64(0); i <= end; i++ {
		hi := max
		if i < end && i < npivots {
			hi = pivots[i]
		} else if i < npivots && pivots[i] != 0 {
			hi = pivots[i]
		}
		if hi < lo || hi > max {
			return fmt.Errorf("maple node at %#x: slot %d spans [%#x, %#x] outside [%#x, %#x]", uint64(addr), i, lo, hi, min, max)
		}
		e := slots[i]
		switch {
		case typ == mapleLeaf64:
			if e != 0 {
				if err := w.vma(VAddr(e), lo, hi); err != nil {
					return err
				}
			}
		case !isMapleChild(e):
			return fmt.Errorf("maple node at %#x: slot %d holds %#x, not a node", uint64(addr), i, e)
		default:
			if err := w.node(e, lo, hi, depth+1); err != nil {
				return err
			}
		}
		if hi == max {
			break
		}
		lo = hi + 1
	}
	return nil
}

// vma reads the VMA at va, which the tree says spans [lo, hi].
func (w *mapleWalk) vma(va VAddr, lo, hi uint64) error {
	if len(w.vmas) >= maxVMAs {
		return fmt.Errorf("more than %d VMAs", maxVMAs)
	}
	var b [8]byte
	read := func(off uint64) (uint64, error) {
		if err := w.k.ReadVirt(b[:], va+VAddr(off)); err != nil {
			return 0, fmt.Errorf("VMA at %#x: %w", uint64(va), err)
		}
		return binary.LittleEndian.Uint64(b[:]), nil
	}
	var v VMA
	var err error
	v.Addr = va
	if v.Start, err = read(w.l.vmStart); err != nil {
		return err
	}
	if v.End, err = read(w.l.vmEnd); err != nil {
		return err
	}
	if v.Start != lo || v.End-1 != hi || v.End <= v.Start || v.Start%PageSize != 0 || v.End%PageSize != 0 {
		return fmt.Errorf("VMA at %#x spans [%#x, %#x), its slot [%#x, %#x]", uint64(va), v.Start, v.End, lo, hi)
	}
	if n := len(w.vmas); n > 0 && w.vmas[n-1].End > v.Start {
		return fmt.Errorf("VMA at %#x starts at %#x, before the one before it ends", uint64(va), v.Start)
	}
	if v.Flags, err = read(w.l.vmFlags); err != nil {
		return err
	}
	if v.PgOff, err = read(w.l.vmPgoff); err != nil {
		return err
	}
	file, err := read(w.l.vmFile)
	if err != nil {
		return err
	}
	v.File = VAddr(file)
	w.vmas = append(w.vmas, v)
	return nil
}
