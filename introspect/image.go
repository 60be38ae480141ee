package introspect

import (
	"bytes"
	"fmt"
)

// MaxKernelImage bounds how much of the kernel image mapping is read from
// a guest: far more than any kernel's text, data and bss together.
const MaxKernelImage = 256 << 20

// KernelImage is the guest kernel image as mapped at run time, from _text
// on, read before any profile is known: enough to find the banner and,
// through the kernel's own kallsyms and BTF, to build a profile.
type KernelImage struct {
	// Text is the runtime address of _text, where Data starts.
	Text VAddr
	// TextPhys is the guest-physical address of _text.
	TextPhys PAddr
	Data     []byte
	// Translator reads the rest of kernel virtual memory.
	Translator *Translator
}

// ReadKernelImage finds the kernel text mapping through the page tables
// rooted at cr3 and reads the contiguous mapping from _text on (the kernel
// maps its image, text to bss, as one run of 2 MiB pages and clears the rest
// of its mapping: arch/x86/mm/init_64.c cleanup_highmap).
func ReadKernelImage(mem *PhysMem, cr3 uint64, la57 bool) (*KernelImage, error) {
	var firstErr error
	for _, root := range rootCandidates(cr3) {
		img, err := readKernelImage(&Translator{Mem: mem, Root: root, LA57: la57})
		if err == nil {
			if _, err = img.Banner(); err == nil {
				return img, nil
			}
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
// with bit 12 set, the kernel half is tried first, and the result is
// accepted only when the kernel's banner is where it belongs.
func rootCandidates(cr3 uint64) []PAddr {
	root := RootFromCR3(cr3)
	if root&(1<<12) != 0 {
		return []PAddr{root &^ (1 << 12), root}
	}
	return []PAddr{root}
}

func readKernelImage(tr *Translator) (*KernelImage, error) {
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
	if end == text {
		return nil, fmt.Errorf("%w: kernel image mapping at %v is empty", ErrKernel, text)
	}
	data := make([]byte, uint64(end-text))
	if _, err := tr.ReadVirt(data, text); err != nil {
		return nil, fmt.Errorf("read kernel image [%v, %v): %w", text, end, err)
	}
	return &KernelImage{Text: text, TextPhys: textPhys, Data: data, Translator: tr}, nil
}

// Banner finds linux_banner in the image: the first "Linux version "
// followed by a release that starts with a digit, up to its newline.
func (img *KernelImage) Banner() (string, error) {
	return FindBanner(img.Data)
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
