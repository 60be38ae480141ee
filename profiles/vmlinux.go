package profiles

import (
	"bufio"
	"bytes"
	"debug/elf"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"

	"github.com/kvmckpt/kvmckpt/internal/safefile"
)

const (
	// maxNotes bounds an ELF note section read for the build ID.
	maxNotes = 1 << 20
	// maxSystemMap bounds a System.map (Debian 6.1's real one is ~6 MiB).
	maxSystemMap = 256 << 20
	// maxFlatImage bounds the flat image built from PT_LOAD segments:
	// x86_64's KERNEL_IMAGE_SIZE.
	maxFlatImage = 1 << 30
)

// BuildOptions adjusts [BuildFromImageWithOptions].
type BuildOptions struct {
	// SystemMap is the path of the kernel's System.map, or "". Its
	// symbols are used, and cross-checked against kallsyms. Debian ships a
	// one-line stub (the real one is in the -dbg package); a System.map
	// without _text is ignored.
	SystemMap string
}

// BuildFromImage builds a profile from a kernel file: an x86 bzImage
// (vmlinuz) or an ELF vmlinux. See [BuildFromImageWithOptions].
func BuildFromImage(path string) (*Profile, error) {
	return BuildFromImageWithOptions(path, BuildOptions{})
}

// BuildFromImageWithOptions builds a profile from a kernel file.
//
// A bzImage's payload is decompressed (gzip, bzip2, lzma, xz, lz4 or
// zstd, told apart by magic as lib/decompress.c does); it is an ELF
// vmlinux with sections but no symbols. From the vmlinux's PT_LOAD
// segments at kernel addresses (the per-CPU segment at 0 is skipped) a
// flat image is built, and the same code as [BuildFromKernelMemory] reads
// it: symbols from the kallsyms tables, types from BTF. If the ELF has a
// symbol table, or opts names a System.map, those symbols are used too,
// and must agree with kallsyms (else the error wraps [ErrMismatch]).
//
// Errors wrap [ErrNotKernelImage], [ErrUnsupportedCompression],
// [ErrMalformed], [ErrTooLarge], [ErrNoKallsyms], [ErrNoBTF],
// [ErrMissingSymbol], [ErrMissingType] or [ErrMismatch].
func BuildFromImageWithOptions(path string, opts BuildOptions) (*Profile, error) {
	var ext map[string]uint64
	if opts.SystemMap != "" {
		f, err := safefile.Open(opts.SystemMap)
		if err != nil {
			return nil, fmt.Errorf("open System.map: %w", err)
		}
		ext, err = parseSystemMap(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("read System.map %s: %w", opts.SystemMap, err)
		}
	}
	f, err := safefile.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open kernel image: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat kernel image: %w", err)
	}
	p, err := buildFromImageReader(f, fi.Size(), ext, maxVmlinux)
	if err != nil {
		return nil, fmt.Errorf("build profile from %s: %w", path, err)
	}
	return p, nil
}

// buildFromImageReader builds a profile from a bzImage or ELF vmlinux of
// the given size. ext are System.map symbols (may be nil); limit bounds
// the decompressed payload.
func buildFromImageReader(r io.ReaderAt, size int64, ext map[string]uint64, limit int) (*Profile, error) {
	ef, pref, err := openKernelELF(r, size, limit)
	if err != nil {
		return nil, err
	}
	in, err := inputFromELF(ef)
	if err != nil {
		return nil, err
	}
	in.prefAddress = pref
	if len(ext) > 0 {
		in.extSyms, in.extSource = ext, "System.map"
	} else if len(in.extSyms) > 0 {
		in.extSource = "ELF symbol table"
	}
	return build(in)
}

// openKernelELF opens r as an ELF vmlinux, or as a bzImage whose payload
// is decompressed to one. pref is the bzImage's pref_address, or 0.
func openKernelELF(r io.ReaderAt, size int64, limit int) (*elf.File, uint64, error) {
	var magic [4]byte
	if _, err := r.ReadAt(magic[:], 0); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, 0, ErrNotKernelImage
		}
		return nil, 0, fmt.Errorf("read kernel image: %w", err)
	}
	if string(magic[:]) == elf.ELFMAG {
		ef, err := openELF(r)
		return ef, 0, err
	}
	if size > maxBzImage {
		return nil, 0, fmt.Errorf("%d-byte file: %w", size, ErrTooLarge)
	}
	b := make([]byte, size)
	if _, err := r.ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, 0, fmt.Errorf("read kernel image: %w", err)
	}
	payload, pref, err := bzImagePayload(b)
	if err != nil {
		return nil, 0, err
	}
	vmlinux, _, err := decompressPayload(payload, limit)
	if err != nil {
		return nil, 0, err
	}
	if !bytes.HasPrefix(vmlinux, []byte(elf.ELFMAG)) {
		return nil, 0, formatErr("bzImage payload", 0, "decompressed payload is not ELF")
	}
	ef, err := openELF(bytes.NewReader(vmlinux))
	return ef, pref, err
}

func openELF(r io.ReaderAt) (*elf.File, error) {
	ef, err := elf.NewFile(r)
	if err != nil {
		return nil, &FormatError{What: "ELF", Off: -1, Msg: "parse", Err: err}
	}
	if ef.Class != elf.ELFCLASS64 || ef.Machine != elf.EM_X86_64 {
		return nil, formatErr("ELF", -1, "%v %v kernel; only x86_64 is supported", ef.Class, ef.Machine)
	}
	return ef, nil
}

// inputFromELF builds the flat image of a vmlinux's kernel segments and
// collects its .BTF section, build ID and symbol table.
func inputFromELF(ef *elf.File) (buildInput, error) {
	base, end := uint64(0), uint64(0)
	var loads []*elf.Prog
	for _, p := range ef.Progs {
		if p.Type != elf.PT_LOAD || p.Vaddr < startKernelMap {
			continue // the per-CPU segment is linked at 0
		}
		if p.Filesz > p.Memsz || p.Vaddr+p.Memsz < p.Vaddr {
			return buildInput{}, formatErr("ELF", int64(p.Off), "bad PT_LOAD segment at %#x", p.Vaddr)
		}
		if len(loads) == 0 || p.Vaddr < base {
			base = p.Vaddr
		}
		end = max(end, p.Vaddr+p.Memsz)
		loads = append(loads, p)
	}
	if len(loads) == 0 {
		return buildInput{}, formatErr("ELF", -1, "no PT_LOAD segment at kernel addresses")
	}
	if end-base > maxFlatImage {
		return buildInput{}, fmt.Errorf("kernel segments span [%#x, %#x): %w", base, end, ErrTooLarge)
	}
	flat := make([]byte, end-base)
	for _, p := range loads {
		o := p.Vaddr - base
		if _, err := p.ReadAt(flat[o:o+p.Filesz], 0); err != nil {
			return buildInput{}, &FormatError{What: "ELF", Off: int64(p.Off), Msg: "read segment", Err: err}
		}
	}
	in := buildInput{img: kernelImage{data: flat, base: base}, linkTime: true, source: "image"}
	if s := ef.Section(".BTF"); s != nil && s.Type != elf.SHT_NOBITS && s.Size <= maxBTFSize {
		if b, err := s.Data(); err == nil {
			in.elfBTF = b
		}
	}
	for _, s := range ef.Sections {
		if s.Type != elf.SHT_NOTE || s.Size > maxNotes {
			continue
		}
		if b, err := s.Data(); err == nil {
			if id := buildIDFromNotes(b); id != "" {
				in.elfBuildID = id
				break
			}
		}
	}
	if syms, err := ef.Symbols(); err == nil {
		in.extSyms = wantedELFSymbols(syms)
	}
	return in, nil
}

// wantedSymbol reports whether a profile records the symbol.
func wantedSymbol(name string) bool {
	return slices.Contains(requiredSymbols, name) || slices.Contains(optionalSymbols, name)
}

// wantedELFSymbols picks the symbols a profile records, preferring global
// ones when static symbols share a name.
func wantedELFSymbols(syms []elf.Symbol) map[string]uint64 {
	out := make(map[string]uint64)
	global := make(map[string]bool)
	for _, s := range syms {
		if s.Section == elf.SHN_UNDEF || !wantedSymbol(s.Name) {
			continue
		}
		g := elf.ST_BIND(s.Info) == elf.STB_GLOBAL
		if _, seen := out[s.Name]; !seen || (g && !global[s.Name]) {
			out[s.Name] = s.Value
			global[s.Name] = g
		}
	}
	return out
}

// parseSystemMap reads "address type name" lines and keeps the symbols a
// profile records. A stub without _text (Debian's) yields nil.
func parseSystemMap(r io.Reader) (map[string]uint64, error) {
	sc := bufio.NewScanner(io.LimitReader(r, maxSystemMap+1))
	sc.Buffer(make([]byte, 0, 4096), 4096)
	out := make(map[string]uint64)
	global := make(map[string]bool)
	n := 0
	for sc.Scan() {
		line := sc.Text()
		n += len(line) + 1
		if n > maxSystemMap {
			return nil, fmt.Errorf("System.map: %w", ErrTooLarge)
		}
		f := strings.Fields(line)
		if len(f) < 3 || len(f[1]) != 1 {
			return nil, formatErr("System.map", int64(n-len(line)-1), "bad line %q", truncate(line, 80))
		}
		a, err := strconv.ParseUint(f[0], 16, 64)
		if err != nil {
			return nil, formatErr("System.map", int64(n-len(line)-1), "bad address in %q", truncate(line, 80))
		}
		name := f[2]
		if !wantedSymbol(name) {
			continue
		}
		g := isUpper(f[1][0])
		if _, seen := out[name]; !seen || (g && !global[name]) {
			out[name] = a
			global[name] = g
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read System.map: %w", err)
	}
	if _, ok := out["_text"]; !ok {
		return nil, nil
	}
	return out, nil
}

// buildIDFromNotes returns the GNU build ID (NT_GNU_BUILD_ID) in a
// sequence of ELF notes, in hex, or "". Each note is namesz, descsz, type
// (32-bit each), then name and desc padded to 4 bytes.
func buildIDFromNotes(b []byte) string {
	const ntGNUBuildID = 3
	for len(b) >= 12 {
		namesz := uint64(binary.LittleEndian.Uint32(b[0:]))
		descsz := uint64(binary.LittleEndian.Uint32(b[4:]))
		typ := binary.LittleEndian.Uint32(b[8:])
		nameEnd := 12 + (namesz+3)&^3
		descEnd := nameEnd + (descsz+3)&^3
		if nameEnd > uint64(len(b)) || descEnd > uint64(len(b)) {
			return ""
		}
		if typ == ntGNUBuildID && namesz == 4 && string(b[12:16]) == "GNU\x00" && descsz > 0 && descsz <= 64 {
			return hex.EncodeToString(b[nameEnd : nameEnd+descsz])
		}
		b = b[descEnd:]
	}
	return ""
}
