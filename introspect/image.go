package introspect

import (
	"bytes"
	"fmt"
)

// MaxKernelImage bounds how much of the kernel image mapping is read from
// a guest: far more than any kernel's text, data and bss together.
const MaxKernelImage = 256 << 20

// minKernelImage is the least a mapping from _text must span to be taken
// for the kernel image: a kernel's text, data and bss span tens of MiB,
// while the user half of a PTI page-table pair maps only the entry text.
const minKernelImage = 4 << 20

// KernelImage is the guest kernel image as mapped at run time, from _text
// on, found before any profile is known: enough to find the banner and,
// through the kernel's own kallsyms and BTF, to build a profile. Its bytes
// are read only when asked for. Not safe for concurrent use.
type KernelImage struct {
	// Text is the runtime address of _text.
	Text VAddr
	// TextPhys is the guest-physical address of _text.
	TextPhys PAddr
	// Size is the length of the contiguous mapping from _text.
	Size uint64
	// Translator reads kernel virtual memory.
	Translator *Translator
	data       []byte
}

// FindKernelImage finds the kernel image through the page tables rooted at
// cr3: the contiguous mapping from _text on (the kernel maps its image, text
// to bss, as one run of 2 MiB pages and clears the rest of its mapping:
// arch/x86/mm/init_64.c cleanup_highmap). It reads none of the image.
func FindKernelImage(mem *PhysMem, cr3 uint64, la57 bool) (*KernelImage, error) {
	var firstErr error
	for _, root := range rootCandidates(cr3) {
		img, err := findKernelImage(&Translator{Mem: mem, Root: root, LA57: la57})
		if err == nil && img.Size < minKernelImage {
			err = fmt.Errorf("%w: kernel mapping at %v spans only %d KiB", ErrKernel, img.Text, img.Size>>10)
		}
		if err == nil {
			return img, nil
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	return nil, firstErr
}

// rootCandidates are the top-level page tables to try for a CR3 value. With
// page-table isolation a vCPU in user mode runs on the user half of an
// 8 KiB PGD pair, bit 12 set, which maps almost none of the kernel
// (arch/x86/mm/pti.c); without PTI, bit 12 is an ordinary address bit. So
// with bit 12 set, the kernel half is tried first, and a candidate is
// accepted only when it maps a whole kernel.
func rootCandidates(cr3 uint64) []PAddr {
	root := RootFromCR3(cr3)
	if root&(1<<12) != 0 {
		return []PAddr{root &^ (1 << 12), root}
	}
	return []PAddr{root}
}

func findKernelImage(tr *Translator) (*KernelImage, error) {
	text, textPhys, err := FindKernelText(tr)
	if err != nil {
		return nil, fmt.Errorf("find kernel text: %w", err)
	}
	// Find where the contiguous mapping ends.
	end := text
	err = tr.Walk(text, text+MaxKernelImage, func(va VAddr, _ PAddr, size uint64) bool {
		if va != end {
			return false
		}
		end = va + VAddr(size)
		return true
	})
	if err != nil {
		return nil, fmt.Errorf("walk kernel image mapping: %w", err)
	}
	return &KernelImage{Text: text, TextPhys: textPhys, Size: uint64(end - text), Translator: tr}, nil
}

// ReadAt reads len(p) bytes of the image at offset off from _text.
func (img *KernelImage) ReadAt(p []byte, off uint64) error {
	if off > img.Size || uint64(len(p)) > img.Size-off {
		return fmt.Errorf("%w: [%#x, %#x) outside the kernel image of %#x bytes", ErrKernel, off, off+uint64(len(p)), img.Size)
	}
	_, err := img.Translator.ReadVirt(p, img.Text+VAddr(off))
	return err
}

// Data reads the whole image (once).
func (img *KernelImage) Data() ([]byte, error) {
	if img.data == nil {
		data := make([]byte, img.Size)
		if err := img.ReadAt(data, 0); err != nil {
			return nil, fmt.Errorf("read kernel image: %w", err)
		}
		img.data = data
	}
	return img.data, nil
}

// Banner finds linux_banner in the image.
func (img *KernelImage) Banner() (string, error) {
	data, err := img.Data()
	if err != nil {
		return "", err
	}
	return FindBanner(data)
}

// FindBanner finds the Linux banner in a kernel image: "Linux version "
// followed by a release that starts with a digit, up to its newline. An
// image may hold more than one such string (a template without the build
// number, say); the longest of the first few is linux_banner itself.
func FindBanner(b []byte) (string, error) {
	const prefix = "Linux version "
	best := ""
	for off, n := 0, 0; n < 16; n++ {
		i := bytes.Index(b[off:], []byte(prefix))
		if i < 0 {
			break
		}
		i += off
		off = i + len(prefix)
		rest := b[off:]
		if len(rest) == 0 || rest[0] < '0' || rest[0] > '9' {
			continue
		}
		if end := bytes.IndexAny(rest, "\n\x00"); end > 0 && end < 1024 && len(prefix)+end > len(best) {
			best = string(b[i : off+end])
		}
	}
	if best == "" {
		return "", fmt.Errorf("%w: no Linux banner in the kernel image", ErrKernel)
	}
	return best, nil
}
