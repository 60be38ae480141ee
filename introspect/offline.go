package introspect

import (
	"context"
	"encoding/binary"
	"fmt"

	"github.com/kvmckpt/kvmckpt/pagemap"
)

// offlineChunk is how many struct pages one read of the memory map covers.
const offlineChunk = 512

// OfflinePages finds the frames the guest kernel marks PageOffline: pages
// it gave away (to its virtio balloon, or unplugged by virtio-mem) and
// promised never to touch again, which makedumpfile leaves out of dumps
// for the same reason. Only the zones fp trusts are scanned, every struct
// page of their span; a page counts as offline only when its page_type is
// exactly PAGE_OFFLINE_MAPCOUNT_VALUE (vmcoreinfo in 6.1, PGTY_offline in
// BTF since 6.12) and it is not free (offline pages are on no free list).
// Parts of the memory map that cannot be read (holes between memory
// sections) are skipped: their pages count as in use.
//
// A profile without the constant gives an error wrapping [ErrProfile].
func (k *Kernel) OfflinePages(ctx context.Context, fp *FreePages) (*pagemap.Bitmap, uint64, error) {
	v, ok := k.Profile.Constants["PAGE_OFFLINE_MAPCOUNT_VALUE"]
	if !ok || v < -1<<31 || v >= 1<<32 {
		return nil, 0, fmt.Errorf("%w: no PAGE_OFFLINE_MAPCOUNT_VALUE (the kernel's vmcoreinfo or BTF did not give it)", ErrProfile)
	}
	if uint32(v) == k.layout.buddyMapcount {
		return nil, 0, fmt.Errorf("%w: PAGE_OFFLINE_MAPCOUNT_VALUE equals PAGE_BUDDY_MAPCOUNT_VALUE (%#x)", ErrProfile, uint32(v))
	}
	want := uint32(v)
	l := k.layout
	out := pagemap.NewBitmap(fp.Free.Len())
	var n uint64
	buf := make([]byte, offlineChunk*l.pageSize)
	for _, z := range fp.Zones {
		if !z.Trusted {
			continue
		}
		end := min(z.StartPFN+z.Spanned, out.Len())
		for pfn := z.StartPFN; pfn < end; pfn += offlineChunk {
			if err := ctx.Err(); err != nil {
				return nil, 0, err
			}
			cnt := min(offlineChunk, end-pfn)
			b := buf[:cnt*l.pageSize]
			if err := k.ReadVirt(b, VAddr(k.VmemmapBase+pfn*l.pageSize)); err != nil {
				continue // a hole in the memory map: no struct pages
			}
			for i := uint64(0); i < cnt; i++ {
				if binary.LittleEndian.Uint32(b[i*l.pageSize+l.pageType:]) != want || fp.Free.Test(pfn+i) {
					continue
				}
				out.Set(pfn + i)
				n++
			}
		}
	}
	return out, n, nil
}
