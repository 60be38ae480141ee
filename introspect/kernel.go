package introspect

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"

	"github.com/kvmckpt/kvmckpt/profiles"
)

// Kernel is a paused guest's kernel, seen through its RAM: KASLR resolved,
// symbols relocated, kernel virtual memory readable. Not safe for concurrent
// use.
type Kernel struct {
	Mem     *PhysMem
	Tr      *Translator
	Profile *profiles.Profile
	// Slide is the virtual KASLR offset: runtime address minus linked
	// address of every kernel image symbol.
	Slide uint64
	// PageOffsetBase and VmemmapBase are the randomized bases of the direct
	// map and of the struct page array (CONFIG_RANDOMIZE_MEMORY).
	PageOffsetBase, VmemmapBase uint64

	layout    *layout
	directEnd uint64 // end of the direct map: PageOffsetBase + highest GPA
	tlb       map[VAddr]PAddr
	// large is the last translation through a 2 MiB or 1 GiB page: the
	// struct page array is mapped with those.
	large struct {
		va   VAddr
		pa   PAddr
		size uint64
	}
}

// Unrelocated _text on x86-64: __START_KERNEL_map + CONFIG_PHYSICAL_START
// for the default 16 MiB.
const maxTLB = 1 << 16

// OpenKernel finds the guest kernel in mem. cr3 is any vCPU's CR3: the
// kernel half of every address space is the same. la57 is CR4.LA57.
func OpenKernel(mem *PhysMem, cr3 uint64, la57 bool, p *profiles.Profile) (*Kernel, error) {
	l, err := resolveLayout(p)
	if err != nil {
		return nil, err
	}
	var first error
	for _, root := range rootCandidates(cr3) {
		k, err := openKernel(mem, root, la57, p, l)
		if err == nil {
			return k, nil
		}
		// A banner mismatch says the most: the kernel was found, and it
		// is another build.
		if first == nil || errors.Is(err, profiles.ErrBannerMismatch) {
			first = err
		}
	}
	return nil, first
}

func openKernel(mem *PhysMem, root PAddr, la57 bool, p *profiles.Profile, l *layout) (*Kernel, error) {
	k := &Kernel{Mem: mem, Tr: &Translator{Mem: mem, Root: root, LA57: la57}, Profile: p, layout: l, tlb: map[VAddr]PAddr{}}
	text, _, err := FindKernelText(k.Tr)
	if err != nil {
		return nil, fmt.Errorf("find kernel text: %w", err)
	}
	linked, ok := p.Symbols["_text"]
	if !ok {
		return nil, fmt.Errorf("%w: no _text symbol", ErrProfile)
	}
	k.Slide = uint64(text) - linked
	if err := k.checkBanner(); err != nil {
		return nil, err
	}
	if k.PageOffsetBase, err = k.symUint64("page_offset_base"); err != nil {
		return nil, err
	}
	if k.VmemmapBase, err = k.symUint64("vmemmap_base"); err != nil {
		return nil, err
	}
	var top uint64
	for _, m := range mem.Mappings() {
		top = max(top, uint64(m.GPA)+m.Size)
	}
	k.directEnd = k.PageOffsetBase + top
	if k.directEnd < k.PageOffsetBase || !k.Tr.Canonical(VAddr(k.PageOffsetBase)) || !k.Tr.Canonical(VAddr(k.VmemmapBase)) {
		return nil, fmt.Errorf("%w: page_offset_base %#x or vmemmap_base %#x is not a kernel address", ErrKernel, k.PageOffsetBase, k.VmemmapBase)
	}
	return k, nil
}

// PGD returns the guest-physical address of the kernel's own top-level
// page table (init_top_pgt): a root that maps the kernel for as long as it
// runs, unlike a vCPU's CR3, which may be a process's.
func (k *Kernel) PGD() (PAddr, error) {
	va, err := k.Sym("init_top_pgt")
	if err != nil {
		return 0, err
	}
	return k.phys(va)
}

// Banner reads linux_banner from guest memory.
func (k *Kernel) Banner() (string, error) {
	va, err := k.Sym("linux_banner")
	if err != nil {
		return "", err
	}
	buf := make([]byte, 512)
	n, err := k.Tr.ReadVirt(buf, va)
	if n == 0 {
		return "", fmt.Errorf("read linux_banner: %w", err)
	}
	buf = buf[:n]
	if i := bytes.IndexAny(buf, "\n\x00"); i >= 0 {
		buf = buf[:i]
	}
	return string(buf), nil
}

func (k *Kernel) checkBanner() error {
	got, err := k.Banner()
	if err != nil {
		return err
	}
	if err := k.Profile.MatchBanner(got); err != nil {
		// The profile's linux_banner address holds something else in
		// another build: name the banner the guest really has.
		if img, ierr := findKernelImage(k.Tr); ierr == nil {
			if real, berr := img.Banner(); berr == nil {
				return k.Profile.MatchBanner(real)
			}
		}
		if !strings.HasPrefix(got, "Linux version ") {
			// Whatever bytes are there (the tail of another string,
			// say) are no banner: do not quote them as one.
			return &profiles.BannerMismatchError{Profile: k.Profile.Banner, Kernel: "unknown (no Linux banner at the profile's linux_banner address)"}
		}
		return err
	}
	return nil
}

// Sym returns the runtime address of a kernel image symbol.
func (k *Kernel) Sym(name string) (VAddr, error) {
	a, ok := k.Profile.Symbols[name]
	if !ok {
		return 0, fmt.Errorf("%w: no symbol %s", ErrProfile, name)
	}
	return VAddr(a + k.Slide), nil
}

func (k *Kernel) symUint64(name string) (uint64, error) {
	va, err := k.Sym(name)
	if err != nil {
		return 0, err
	}
	v, err := k.Uint64(va)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", name, err)
	}
	return v, nil
}

// phys translates a kernel virtual address: the direct map by arithmetic,
// everything else through the page tables, with a small cache of 4 KiB
// translations.
func (k *Kernel) phys(va VAddr) (PAddr, error) {
	if uint64(va) >= k.PageOffsetBase && uint64(va) < k.directEnd {
		return PAddr(uint64(va) - k.PageOffsetBase), nil
	}
	if l := &k.large; l.size != 0 && va >= l.va && uint64(va-l.va) < l.size {
		return l.pa + PAddr(va-l.va), nil
	}
	page := va.RoundDown()
	if pa, ok := k.tlb[page]; ok {
		return pa + PAddr(va.PageOffset()), nil
	}
	pa, size, err := k.Tr.translate(page)
	if err != nil {
		return 0, err
	}
	if size > PageSize {
		base := page &^ VAddr(size-1)
		k.large.va, k.large.pa, k.large.size = base, pa-PAddr(page-base), size
	} else {
		if len(k.tlb) >= maxTLB {
			clear(k.tlb)
		}
		k.tlb[page] = pa
	}
	return pa + PAddr(va.PageOffset()), nil
}

// Read reads kernel virtual memory; p must not cross a 4 KiB page unless va
// is in the direct map.
func (k *Kernel) read(p []byte, va VAddr) error {
	if va.PageOffset()+uint64(len(p)) > PageSize && !(uint64(va) >= k.PageOffsetBase && uint64(va)+uint64(len(p)) <= k.directEnd) {
		_, err := k.Tr.ReadVirt(p, va)
		return err
	}
	pa, err := k.phys(va)
	if err != nil {
		return err
	}
	_, err = k.Mem.ReadAt(p, pa)
	return err
}

// Uint64 reads a little-endian uint64 of kernel virtual memory.
func (k *Kernel) Uint64(va VAddr) (uint64, error) {
	var b [8]byte
	if err := k.read(b[:], va); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

// Uint32 reads a little-endian uint32 of kernel virtual memory.
func (k *Kernel) Uint32(va VAddr) (uint32, error) {
	var b [4]byte
	if err := k.read(b[:], va); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint32(b[:]), nil
}

// ReadVirt reads len(p) bytes of kernel virtual memory at va.
func (k *Kernel) ReadVirt(p []byte, va VAddr) error {
	for len(p) > 0 {
		n := min(uint64(len(p)), PageSize-va.PageOffset())
		if err := k.read(p[:n], va); err != nil {
			return err
		}
		p, va = p[n:], va+VAddr(n)
	}
	return nil
}
