package migstream

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
)

var (
	// ErrFormat means the stream is not a well-formed QEMU migration
	// stream.
	ErrFormat = errors.New("malformed migration stream")
	// ErrUnsupported means the stream has something the filter cannot
	// read past: a section other than ram's before ram's end, a
	// compressed or XBZRLE page, multifd.
	ErrUnsupported = errors.New("migration stream not supported")
)

// Stream constants (migration/savevm.c, migration/ram.c).
const (
	fileMagic   = 0x5145564d // "QEVM"
	fileVersion = 3

	vmEOF           = 0x00
	vmSectionStart  = 0x01
	vmSectionPart   = 0x02
	vmSectionEnd    = 0x03
	vmSectionFull   = 0x04
	vmSubsection    = 0x05
	vmConfiguration = 0x07
	vmCommand       = 0x08
	vmSectionFooter = 0x7e

	flagZero         = 0x02
	flagMemSize      = 0x04
	flagPage         = 0x08
	flagEOS          = 0x10
	flagContinue     = 0x20
	flagXBZRLE       = 0x40
	flagHook         = 0x80
	flagCompressPage = 0x100
	flagMultifdFlush = 0x200
)

// PageSize is the page of the stream's RAM records: TARGET_PAGE_SIZE of
// x86, whose low bits carry a record's flags.
const PageSize = 4096

// MaxBlocks bounds the RAM blocks a stream may list.
const MaxBlocks = 1024

// DefaultMaxKept is [Options].MaxKept unless set.
const DefaultMaxKept = 256 << 20

// Block is a RAM block, as the stream's ram section lists it.
type Block struct {
	// ID is the block's idstr: a memory backend's id, or QEMU's name
	// for its own RAM ("pc.bios", "0000:00:02.0/vga.vram", ...).
	ID string
	// Size is its used length in bytes.
	Size uint64
}

// Options says what [Filter] drops and whom it tells.
type Options struct {
	// Drop reports whether the pages of a block leave the stream.
	Drop func(Block) bool
	// Blocks, if not nil, is called with the stream's blocks, in the
	// stream's order, once the ram START section is read; an error from
	// it ends the filter.
	Blocks func([]Block) error
	// Page, if not nil, is called for every page record of a dropped
	// block, with the block's index in the list, the page's byte offset
	// in it, and whether the record says the page is zero. It may block:
	// the filter reads nothing meanwhile, and the sender, its writes
	// stalled, sends nothing either.
	Page func(block int, offset uint64, zero bool)
	// RAMDone, if not nil, is called once ram's END section is read: by
	// then Page has been told of every page the stream carried.
	RAMDone func()
	// MaxKept bounds the bytes of the blocks that are kept; 0 means
	// DefaultMaxKept.
	MaxKept uint64

	// IgnoreShared says the stream was written with x-ignore-shared on:
	// its block list gives each block's guest-physical address too.
	IgnoreShared bool
	// Stock writes the stream as QEMU writes it with x-ignore-shared
	// off, which any QEMU loads without setting a capability: the
	// capability leaves the configuration, the addresses the block list.
	Stock bool
	// Insert, if not nil, is called once the ram START section is
	// written, to write page records into a PART section of its own
	// (see [Pages]); an error from it ends the filter.
	Insert func(blocks []Block, p *Pages) error
}

// Pages writes page records into the stream (see [Options].Insert).
type Pages struct {
	w    *bufio.Writer
	last int
	ids  []Block
	n    uint64
}

// Page writes the page at byte offset off of block blk (an index into the
// blocks Insert was given) with its bytes, [PageSize] of them.
func (p *Pages) Page(blk int, off uint64, data []byte) error {
	if len(data) != PageSize {
		return fmt.Errorf("page of %d bytes", len(data))
	}
	if err := p.record(blk, off, flagPage); err != nil {
		return err
	}
	_, err := p.w.Write(data)
	return err
}

// Fill writes the page at off of block blk as every byte fill (QEMU's
// zero-page record, which carries the byte).
func (p *Pages) Fill(blk int, off uint64, fill byte) error {
	if err := p.record(blk, off, flagZero); err != nil {
		return err
	}
	return p.w.WriteByte(fill)
}

func (p *Pages) record(blk int, off, flags uint64) error {
	if blk < 0 || blk >= len(p.ids) || off%PageSize != 0 || off >= p.ids[blk].Size {
		return fmt.Errorf("page at %#x of block %d: not in the stream's blocks", off, blk)
	}
	hdr := off | flags
	if blk == p.last {
		hdr |= flagContinue
	}
	var b [8 + 1 + 255]byte
	out := binary.BigEndian.AppendUint64(b[:0], hdr)
	if blk != p.last {
		out = append(out, byte(len(p.ids[blk].ID)))
		out = append(out, p.ids[blk].ID...)
	}
	p.last = blk
	p.n++
	_, err := p.w.Write(out)
	return err
}

// Stats is what [Filter] saw.
type Stats struct {
	// Dropped counts the page records of dropped blocks, Kept those of
	// kept blocks (a page sent twice counts twice).
	Dropped, Kept uint64
	// KeptPages is the pages of kept blocks written out.
	KeptPages uint64
	// Inserted is the page records [Options].Insert wrote.
	Inserted uint64
}

// Filter reads a pre-copy migration stream from r until its end and
// writes to w the same stream without the page records of the blocks
// opt.Drop names (see the package comment). It returns an error wrapping
// [ErrFormat] or [ErrUnsupported] for a stream it cannot read, or the
// error of r or w.
func Filter(r io.Reader, w io.Writer, opt Options) (Stats, error) {
	if opt.MaxKept == 0 {
		opt.MaxKept = DefaultMaxKept
	}
	f := &filter{r: bufio.NewReaderSize(r, 1<<20), w: w, opt: opt, last: -1}
	err := f.run()
	return f.stats, err
}

type filter struct {
	r     *bufio.Reader
	w     io.Writer
	opt   Options
	stats Stats

	ramID  uint32 // section id of "ram"
	ramSet bool
	blocks []Block
	drop   []bool
	// kept holds the last record of each page of a kept block: nil if
	// none came, one byte (the fill) for a zero page, else the page.
	kept    [][][]byte
	last    int // block of the record before (RAM_SAVE_FLAG_CONTINUE)
	scratch [256]byte
}

func formatErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrFormat, fmt.Sprintf(format, args...))
}

func (f *filter) read(n int) ([]byte, error) {
	if n > len(f.scratch) {
		return nil, formatErr("field of %d bytes", n)
	}
	b := f.scratch[:n]
	if _, err := io.ReadFull(f.r, b); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, formatErr("stream ends early")
		}
		return nil, fmt.Errorf("read migration stream: %w", err)
	}
	return b, nil
}

func (f *filter) u8() (byte, error) {
	b, err := f.read(1)
	if err != nil {
		return 0, err
	}
	return b[0], nil
}

func (f *filter) be16() (uint16, error) {
	b, err := f.read(2)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint16(b), nil
}

func (f *filter) be32() (uint32, error) {
	b, err := f.read(4)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint32(b), nil
}

func (f *filter) be64() (uint64, error) {
	b, err := f.read(8)
	if err != nil {
		return 0, err
	}
	return binary.BigEndian.Uint64(b), nil
}

// str reads a u8 length and that many bytes.
func (f *filter) str() (string, error) {
	n, err := f.u8()
	if err != nil {
		return "", err
	}
	b, err := f.read(int(n))
	if err != nil {
		return "", err
	}
	return string(b), nil
}

func (f *filter) write(b []byte) error {
	if _, err := f.w.Write(b); err != nil {
		return fmt.Errorf("write filtered migration stream: %w", err)
	}
	return nil
}

func (f *filter) run() error {
	magic, err := f.be32()
	if err != nil {
		return err
	}
	ver, err := f.be32()
	if err != nil {
		return err
	}
	if magic != fileMagic || ver != fileVersion {
		return formatErr("header %#x version %d, want %#x version %d", magic, ver, fileMagic, fileVersion)
	}
	out := binary.BigEndian.AppendUint32(nil, magic)
	out = binary.BigEndian.AppendUint32(out, ver)
	if err := f.write(out); err != nil {
		return err
	}
	for {
		t, err := f.u8()
		if err != nil {
			return err
		}
		switch t {
		case vmConfiguration:
			err = f.configuration()
		case vmSectionStart:
			err = f.start()
		case vmSectionPart, vmSectionEnd:
			var end bool
			if end, err = f.part(t == vmSectionEnd); err == nil && end {
				if f.opt.RAMDone != nil {
					f.opt.RAMDone()
				}
				// The rest is the device state and the end: passed on
				// as it comes.
				if _, err := io.Copy(f.w, f.r); err != nil {
					return fmt.Errorf("copy device state: %w", err)
				}
				return nil
			}
		case vmCommand:
			err = f.command()
		case vmSectionFull:
			id, _ := f.be32()
			idstr, _ := f.str()
			err = fmt.Errorf("%w: device state (section %d, %q) before the end of RAM", ErrUnsupported, id, idstr)
		case vmEOF:
			err = formatErr("stream ends before RAM does")
		default:
			err = formatErr("section type %#x", t)
		}
		if err != nil {
			return err
		}
	}
}

// configuration passes on the configuration section: the machine type,
// and the subsections QEMU may send (migration/savevm.c,
// vmstate_configuration).
func (f *filter) configuration() error {
	n, err := f.be32()
	if err != nil {
		return err
	}
	name, err := f.read(int(min(n, 256)))
	if err != nil || n > 255 {
		return formatErr("configuration name of %d bytes", n)
	}
	out := append([]byte{vmConfiguration}, binary.BigEndian.AppendUint32(nil, n)...)
	out = append(out, name...)
	for {
		b, err := f.r.Peek(1)
		if err != nil || b[0] != vmSubsection {
			break
		}
		f.r.ReadByte()
		sub, err := f.str()
		if err != nil {
			return err
		}
		ver, err := f.be32()
		if err != nil {
			return err
		}
		out = append(out, vmSubsection, byte(len(sub)))
		out = append(out, sub...)
		out = binary.BigEndian.AppendUint32(out, ver)
		switch sub {
		case "configuration/target-page-bits":
			b, err := f.read(4)
			if err != nil {
				return err
			}
			out = append(out, b...)
		case "configuration/uuid":
			b, err := f.read(16)
			if err != nil {
				return err
			}
			out = append(out, b...)
		case "configuration/capabilities":
			count, err := f.be32()
			if err != nil {
				return err
			}
			if count > 64 {
				return formatErr("%d capabilities", count)
			}
			var caps []string
			for range count {
				c, err := f.str()
				if err != nil {
					return err
				}
				if f.opt.Stock && c == "x-ignore-shared" {
					continue
				}
				caps = append(caps, c)
			}
			if f.opt.Stock && len(caps) == 0 {
				// QEMU sends the subsection only with a capability
				// to check (savevm.c, vmstate_capabilites_needed).
				out = out[:len(out)-(1+1+len(sub)+4)]
				continue
			}
			out = binary.BigEndian.AppendUint32(out, uint32(len(caps)))
			for _, c := range caps {
				out = append(out, byte(len(c)))
				out = append(out, c...)
			}
		default:
			return fmt.Errorf("%w: configuration subsection %q", ErrUnsupported, sub)
		}
	}
	return f.write(out)
}

// command passes on a command (a be16 command, a be16 length, data).
func (f *filter) command() error {
	cmd, err := f.be16()
	if err != nil {
		return err
	}
	n, err := f.be16()
	if err != nil {
		return err
	}
	out := []byte{vmCommand}
	out = binary.BigEndian.AppendUint16(out, cmd)
	out = binary.BigEndian.AppendUint16(out, n)
	data := make([]byte, n) // at most 64 KiB
	if _, err := io.ReadFull(f.r, data); err != nil {
		return formatErr("command %d ends early", cmd)
	}
	return f.write(append(out, data...))
}

// footer reads a section footer, if one follows, and returns it.
func (f *filter) footer(id uint32) ([]byte, error) {
	b, err := f.r.Peek(1)
	if err != nil || b[0] != vmSectionFooter {
		return nil, nil
	}
	f.r.ReadByte()
	got, err := f.be32()
	if err != nil {
		return nil, err
	}
	if got != id {
		return nil, formatErr("footer of section %d ends section %d", got, id)
	}
	return binary.BigEndian.AppendUint32([]byte{vmSectionFooter}, id), nil
}

// start reads ram's START section, passes it on and records its blocks.
func (f *filter) start() error {
	id, err := f.be32()
	if err != nil {
		return err
	}
	idstr, err := f.str()
	if err != nil {
		return err
	}
	inst, err := f.be32()
	if err != nil {
		return err
	}
	ver, err := f.be32()
	if err != nil {
		return err
	}
	if idstr != "ram" {
		return fmt.Errorf("%w: iterable section %q (only ram is read)", ErrUnsupported, idstr)
	}
	if f.ramSet {
		return formatErr("second ram section")
	}
	f.ramID, f.ramSet = id, true
	out := binary.BigEndian.AppendUint32([]byte{vmSectionStart}, id)
	out = append(out, byte(len(idstr)))
	out = append(out, idstr...)
	out = binary.BigEndian.AppendUint32(out, inst)
	out = binary.BigEndian.AppendUint32(out, ver)
	hdr, err := f.be64()
	if err != nil {
		return err
	}
	if hdr&(PageSize-1) != flagMemSize {
		return formatErr("ram section starts with flags %#x, not the RAM size", hdr&(PageSize-1))
	}
	out = binary.BigEndian.AppendUint64(out, hdr)
	total := hdr &^ (PageSize - 1)
	var sum, kept uint64
	for sum < total {
		if len(f.blocks) == MaxBlocks {
			return formatErr("more than %d RAM blocks", MaxBlocks)
		}
		name, err := f.str()
		if err != nil {
			return err
		}
		size, err := f.be64()
		if err != nil {
			return err
		}
		if name == "" || size == 0 || size%PageSize != 0 || size > total-sum {
			return formatErr("RAM block %q of %d bytes (%d of %d listed)", name, size, sum, total)
		}
		sum += size
		var addr uint64
		if f.opt.IgnoreShared {
			if addr, err = f.be64(); err != nil {
				return err
			}
		}
		b := Block{ID: name, Size: size}
		drop := f.opt.Drop != nil && f.opt.Drop(b)
		var pages [][]byte
		if !drop {
			if kept += size; kept > f.opt.MaxKept {
				return fmt.Errorf("%w: the RAM blocks kept hold more than %d bytes", ErrUnsupported, f.opt.MaxKept)
			}
			pages = make([][]byte, size/PageSize)
		}
		f.blocks = append(f.blocks, b)
		f.drop = append(f.drop, drop)
		f.kept = append(f.kept, pages)
		out = append(out, byte(len(name)))
		out = append(out, name...)
		out = binary.BigEndian.AppendUint64(out, size)
		if f.opt.IgnoreShared && !f.opt.Stock {
			out = binary.BigEndian.AppendUint64(out, addr)
		}
	}
	if f.opt.Blocks != nil {
		if err := f.opt.Blocks(f.blocks); err != nil {
			return err
		}
	}
	// The rest of setup: nothing but the end, without RDMA or multifd.
	eos, err := f.be64()
	if err != nil {
		return err
	}
	if eos != flagEOS {
		return fmt.Errorf("%w: ram setup record with flags %#x", ErrUnsupported, eos&(PageSize-1))
	}
	out = binary.BigEndian.AppendUint64(out, eos)
	foot, err := f.footer(id)
	if err != nil {
		return err
	}
	if err := f.write(append(out, foot...)); err != nil {
		return err
	}
	if f.opt.Insert == nil {
		return nil
	}
	// A PART section of ram's own, footed like its START.
	bw := bufio.NewWriterSize(f.w, 1<<20)
	bw.Write(binary.BigEndian.AppendUint32([]byte{vmSectionPart}, id))
	p := &Pages{w: bw, last: -1, ids: f.blocks}
	if err := f.opt.Insert(slices.Clone(f.blocks), p); err != nil {
		return err
	}
	bw.Write(binary.BigEndian.AppendUint64(nil, flagEOS))
	if len(foot) > 0 {
		bw.Write(binary.BigEndian.AppendUint32([]byte{vmSectionFooter}, id))
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write migration stream: %w", err)
	}
	f.stats.Inserted = p.n
	return nil
}

// part reads a PART or END section of ram: page records until EOS. The
// END section is written out with the kept blocks' pages; a PART section
// is not written.
func (f *filter) part(end bool) (bool, error) {
	id, err := f.be32()
	if err != nil {
		return false, err
	}
	if !f.ramSet || id != f.ramID {
		return false, fmt.Errorf("%w: section %d is not ram's, before ram's end", ErrUnsupported, id)
	}
	if err := f.records(); err != nil {
		return false, err
	}
	foot, err := f.footer(id)
	if err != nil || !end {
		return false, err
	}
	out := binary.BigEndian.AppendUint32([]byte{vmSectionEnd}, id)
	if err := f.write(out); err != nil {
		return false, err
	}
	if err := f.writeKept(); err != nil {
		return false, err
	}
	return true, f.write(append(binary.BigEndian.AppendUint64(nil, flagEOS), foot...))
}

// records reads page records until EOS.
func (f *filter) records() error {
	for {
		hdr, err := f.be64()
		if err != nil {
			return err
		}
		flags, off := hdr&(PageSize-1), hdr&^(PageSize-1)
		if flags&flagEOS != 0 {
			if flags != flagEOS {
				return formatErr("end record with flags %#x", flags)
			}
			return nil
		}
		switch {
		case flags&(flagXBZRLE|flagCompressPage|flagHook|flagMultifdFlush) != 0:
			return fmt.Errorf("%w: RAM record with flags %#x (XBZRLE, compression, RDMA or multifd)", ErrUnsupported, flags)
		case flags&^flagContinue != flagZero && flags&^flagContinue != flagPage:
			return formatErr("RAM record with flags %#x", flags)
		}
		blk := f.last
		if flags&flagContinue == 0 {
			name, err := f.str()
			if err != nil {
				return err
			}
			blk = -1
			for i, b := range f.blocks {
				if b.ID == name {
					blk = i
					break
				}
			}
			if blk < 0 {
				return formatErr("page of unknown RAM block %q", name)
			}
		}
		if blk < 0 {
			return formatErr("first page record continues no block")
		}
		f.last = blk
		if off >= f.blocks[blk].Size {
			return formatErr("page at %#x past the %#x bytes of RAM block %q", off, f.blocks[blk].Size, f.blocks[blk].ID)
		}
		if f.drop[blk] {
			f.stats.Dropped++
			n := 1
			if flags&flagPage != 0 {
				n = PageSize
			}
			if _, err := f.r.Discard(n); err != nil {
				return formatErr("page record ends early")
			}
			if f.opt.Page != nil {
				f.opt.Page(blk, off, flags&flagZero != 0)
			}
			continue
		}
		f.stats.Kept++
		slot := &f.kept[blk][off/PageSize]
		if flags&flagZero != 0 {
			fill, err := f.u8()
			if err != nil {
				return err
			}
			*slot = append((*slot)[:0], fill)
			continue
		}
		if cap(*slot) < PageSize {
			*slot = make([]byte, PageSize)
		}
		*slot = (*slot)[:PageSize]
		if _, err := io.ReadFull(f.r, *slot); err != nil {
			return formatErr("page record ends early")
		}
	}
}

// writeKept writes the last record of every page of the kept blocks.
func (f *filter) writeKept() error {
	bw := bufio.NewWriterSize(f.w, 1<<20)
	for i, pages := range f.kept {
		first := true
		for p, data := range pages {
			if data == nil {
				continue
			}
			f.stats.KeptPages++
			hdr := uint64(p) * PageSize
			if len(data) == 1 {
				hdr |= flagZero
			} else {
				hdr |= flagPage
			}
			if !first {
				hdr |= flagContinue
			}
			var b []byte
			b = binary.BigEndian.AppendUint64(b, hdr)
			if first {
				b = append(b, byte(len(f.blocks[i].ID)))
				b = append(b, f.blocks[i].ID...)
				first = false
			}
			bw.Write(b)
			bw.Write(data)
		}
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write filtered migration stream: %w", err)
	}
	return nil
}
