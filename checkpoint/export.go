package checkpoint

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/kvmckpt/kvmckpt/migstream"
	"github.com/kvmckpt/kvmckpt/writer"
)

// Export formats.
const (
	// FormatQEMU is a migration stream, as QEMU writes one with
	// x-ignore-shared off: any QEMU of the checkpoint's version or later,
	// started like the source with "-incoming", loads it.
	FormatQEMU = "qemu"
	// FormatLibvirt is a libvirt save image: `virsh restore` loads it.
	FormatLibvirt = "libvirt"
)

// ExportOptions say which checkpoint to write as what.
type ExportOptions struct {
	Input string
	Key   []byte
	// Output is the file to write; an older file of that name survives
	// any failure.
	Output string
	// Format is [FormatQEMU] or [FormatLibvirt].
	Format string
	// DomainXML is the libvirt domain of a [FormatLibvirt] image, for a
	// checkpoint that records none (one not saved through libvirt).
	DomainXML []byte
	// Paused makes `virsh restore` of a [FormatLibvirt] image leave the
	// guest paused; by default it runs, as after a `virsh save` of a
	// running guest.
	Paused bool
	// Progress, if not nil, is called as pages are written.
	Progress func(done, total uint64)
	Log      *slog.Logger
}

// ExportResult is what an export wrote. The JSON names are part of the
// CLI.
type ExportResult struct {
	Output string `json:"output"`
	Format string `json:"format"`
	Bytes  int64  `json:"bytes"`
	// PagesWritten are the page records of saved pages; PagesFilled those
	// of unsaved pages that must hold the fill byte (none when it is
	// zero: the target's fresh RAM is zero already).
	PagesWritten uint64 `json:"pages_written"`
	PagesFilled  uint64 `json:"pages_filled"`
	DurationMS   int64  `json:"duration_ms"`
}

// ErrExport means a checkpoint cannot be written in the asked format.
var ErrExport = errors.New("cannot export")

// Export writes a checkpoint as a standard QEMU migration stream, or a
// libvirt save image holding one: the saved pages as page records, the
// pages not saved left out (so the target, whose fresh RAM is zero, keeps
// them zero) or, with a fill byte other than zero, sent as that byte; then
// the device state, with QEMU's own small RAM blocks, as QEMU saved it.
// The target must start with zeroed RAM, as a new QEMU's anonymous or
// memfd RAM is (a mem-path file must be new).
func Export(ctx context.Context, opt ExportOptions) (*ExportResult, error) {
	start := time.Now()
	if opt.Format != FormatQEMU && opt.Format != FormatLibvirt {
		return nil, fmt.Errorf("%w: format %q: want %q or %q", ErrExport, opt.Format, FormatQEMU, FormatLibvirt)
	}
	if opt.Output == "" {
		return nil, fmt.Errorf("%w: no output file", ErrExport)
	}
	r, err := openWhole(opt.Input, opt.Key, "export")
	if err != nil {
		return nil, err
	}
	defer r.Close()
	h := r.Header()
	if f := h.DeviceStateForm; f != writer.DeviceStateIgnoreShared && f != writer.DeviceStateFiltered {
		return nil, fmt.Errorf("%w: device state of form %q, which this kvmckpt does not know", ErrInvalid, f)
	}
	if _, err := io.Copy(io.Discard, r.DeviceState()); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	var xml []byte
	if opt.Format == FormatLibvirt {
		if xml = opt.DomainXML; xml == nil {
			xml = []byte(h.LibvirtXML)
		}
		if len(xml) == 0 {
			return nil, fmt.Errorf("%w: the checkpoint records no libvirt domain (it was not saved with --domain); give the domain's XML with --xml FILE (virsh dumpxml --migratable NAME)", ErrExport)
		}
	}
	if err := checkNotMapped(opt.Output, "output", "write the export elsewhere"); err != nil {
		return nil, err
	}
	dir, base := filepath.Split(opt.Output)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".export-*")
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	done := false
	defer func() {
		if !done {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err := tmp.Chmod(0o600); err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	bw := bufio.NewWriterSize(tmp, 4<<20)
	if opt.Format == FormatLibvirt {
		if err := writeLibvirtHeader(bw, xml, !opt.Paused); err != nil {
			return nil, fmt.Errorf("export: %w", err)
		}
	}
	res := &ExportResult{Output: opt.Output, Format: opt.Format}
	if err := exportStream(ctx, bw, r, res, opt.Progress); err != nil {
		return nil, err
	}
	if err := bw.Flush(); err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	st, err := tmp.Stat()
	if err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	if err := os.Rename(tmp.Name(), opt.Output); err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	done = true
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	res.Bytes = st.Size()
	res.DurationMS = time.Since(start).Milliseconds()
	return res, nil
}

// exportStream writes the checkpoint's device state as a stock stream
// with its pages inserted.
func exportStream(ctx context.Context, w io.Writer, r *writer.Reader, res *ExportResult, progress func(done, total uint64)) error {
	h := r.Header()
	used := r.Bitmap()
	starts := make([]uint64, 0, len(h.Regions)+1)
	var total uint64
	for _, reg := range h.Regions {
		starts = append(starts, total)
		total += reg.Size / writer.PageSize
	}
	starts = append(starts, total)
	isRegion := func(b migstream.Block) int {
		return slices.IndexFunc(h.Regions, func(reg writer.Region) bool {
			return (b.ID == reg.ID || b.ID == "/objects/"+reg.ID) && b.Size == reg.Size
		})
	}
	insert := func(blocks []migstream.Block, p *migstream.Pages) error {
		// Each region's block in the stream.
		blk := make([]int, len(h.Regions))
		for i := range blk {
			blk[i] = -1
		}
		for j, b := range blocks {
			if i := isRegion(b); i >= 0 {
				blk[i] = j
			}
		}
		for i, j := range blk {
			if j < 0 {
				return fmt.Errorf("%w: the device state's stream does not list RAM backend %q", ErrInvalid, h.Regions[i].ID)
			}
		}
		region := func(page uint64) (int, uint64) {
			i, _ := slices.BinarySearchFunc(starts[1:], page, func(s, p uint64) int {
				if s <= p {
					return -1
				}
				return 1
			})
			return i, (page - starts[i]) * writer.PageSize
		}
		order := make([]int, r.NumChunks())
		for i := range order {
			order[i] = i
		}
		slices.SortFunc(order, func(a, b int) int { return cmp.Compare(r.Chunk(a).FirstPage, r.Chunk(b).FirstPage) })
		var buf []byte
		var done uint64
		for _, ci := range order {
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("export interrupted: %w", err)
			}
			c := r.Chunk(ci)
			data, err := r.ReadChunk(ci, buf)
			if err != nil {
				return fmt.Errorf("%w: %w", ErrInvalid, err)
			}
			buf = data
			page, ok := c.FirstPage, true
			for k := range c.Pages {
				if k > 0 {
					page, ok = used.NextSet(page + 1)
				}
				if !ok || !used.Test(page) {
					return fmt.Errorf("%w: chunk %d holds more pages than the bitmap has from page %d", ErrInvalid, ci, c.FirstPage)
				}
				i, off := region(page)
				if err := p.Page(blk[i], off, data[k*writer.PageSize:(k+1)*writer.PageSize]); err != nil {
					return fmt.Errorf("export: %w", err)
				}
			}
			done += c.Pages
			res.PagesWritten += c.Pages
			if progress != nil {
				progress(done, h.Pages.Saved)
			}
		}
		if h.FillByte != 0 {
			for s, n := range used.ClearRuns() {
				for page := s; page < s+n; page++ {
					i, off := region(page)
					if err := p.Fill(blk[i], off, h.FillByte); err != nil {
						return fmt.Errorf("export: %w", err)
					}
					res.PagesFilled++
				}
			}
		}
		return nil
	}
	_, err := migstream.Filter(r.DeviceState(), w, migstream.Options{
		IgnoreShared: h.DeviceStateForm == writer.DeviceStateIgnoreShared,
		Stock:        true,
		Drop:         func(b migstream.Block) bool { return isRegion(b) >= 0 },
		Insert:       insert,
	})
	if err != nil {
		if errors.Is(err, migstream.ErrFormat) || errors.Is(err, migstream.ErrUnsupported) {
			return fmt.Errorf("%w: device state: %w", ErrInvalid, err)
		}
		return err
	}
	return nil
}

// A libvirt save image (libvirt's src/qemu/qemu_saveimage.h): a header of
// the magic, five 32-bit fields in the host's byte order (version 2, the
// length of the data after the header, whether the guest runs after the
// restore, the compression, the offset of a cookie in the data) and 14
// unused ones; then the data: the domain XML with its NUL, and room for a
// longer one (libvirt leaves 64 KiB); then the migration stream.
const (
	libvirtMagic   = "LibvirtQemudSave"
	libvirtVersion = 2
	libvirtPadding = 64 << 10
	libvirtUnused  = 14
)

// writeLibvirtHeader writes the header of a libvirt save image and its
// data: the domain XML, no cookie, uncompressed. running says whether
// `virsh restore` starts the guest's CPUs.
func writeLibvirtHeader(w io.Writer, xml []byte, running bool) error {
	if bytes.IndexByte(xml, 0) >= 0 {
		return fmt.Errorf("%w: the domain XML holds a NUL byte", ErrExport)
	}
	dataLen := len(xml) + 1 + libvirtPadding
	if dataLen > math.MaxUint32 {
		return fmt.Errorf("%w: a domain XML of %d bytes", ErrExport, len(xml))
	}
	hdr := []byte(libvirtMagic)
	wasRunning := uint32(0)
	if running {
		wasRunning = 1
	}
	for _, v := range []uint32{libvirtVersion, uint32(dataLen), wasRunning, 0 /* raw */, 0 /* no cookie */} {
		hdr = binary.NativeEndian.AppendUint32(hdr, v)
	}
	hdr = append(hdr, make([]byte, 4*libvirtUnused)...)
	hdr = append(hdr, xml...)
	hdr = append(hdr, make([]byte, 1+libvirtPadding)...)
	_, err := w.Write(hdr)
	return err
}
