// Package elfcore writes ELF core files of x86-64 Linux processes, in the
// layout the Linux kernel's own core dumps have (fs/binfmt_elf.c) and gdb
// and Go's debug/elf read: an ELF header, one program header of notes and
// one PT_LOAD per memory segment, the notes, then the segments' bytes.
//
// It knows ELF and the x86-64 note layouts only; what a process is made of
// (its threads, registers, memory areas) is the caller's.
package elfcore

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Regs is a thread's user_regs_struct (arch/x86/include/asm/user_64.h):
// pt_regs' 21 words in order, then the TLS bases and the data selectors.
type Regs struct {
	R15, R14, R13, R12, BP, BX, R11, R10, R9, R8 uint64
	AX, CX, DX, SI, DI, OrigAX, IP, CS, Flags    uint64
	SP, SS, FSBase, GSBase, DS, ES, FS, GS       uint64
}

// Thread is one thread of the process.
type Thread struct {
	// PID is the thread's id, as the core's reader will show it.
	PID int32
	// Regs are its user-mode registers.
	Regs Regs
	// Signal is the signal it stopped with (pr_cursig), 0 if none.
	Signal uint16
}

// Process is the process-wide part of NT_PRPSINFO and NT_PRSTATUS.
type Process struct {
	PID, PPID, PGRP, SID int32
	UID, GID             uint32
	// State is ps's letter (R, S, D, ...); Flags the task's flags.
	State byte
	Flags uint64
	// Name is the command name (at most 15 bytes are stored); Args the
	// arguments joined by spaces (at most 79 bytes are stored).
	Name, Args string
}

// File is one file-backed memory area, for NT_FILE.
type File struct {
	Start, End uint64 // [Start, End)
	// PgOff is the area's offset in the file, in pages.
	PgOff uint64
	Path  string
}

// Segment flags (p_flags).
const (
	FlagX = 1
	FlagW = 2
	FlagR = 4
)

// Segment is one PT_LOAD: the bytes of [Addr, Addr+Size) of the process's
// memory, read from the [Memory]. Memory a core has no bytes for is in no
// segment: readers take the part of a segment past its file bytes for
// zeros (gdb does), so a core says "not there" only by leaving it out.
type Segment struct {
	Addr, Size uint64
	Flags      uint32
}

// Memory reads the process's memory for the present segments.
type Memory interface {
	// ReadAt fills p with the bytes at addr. The range lies within one
	// segment.
	ReadAt(p []byte, addr uint64) error
}

// Core is what a core file holds.
type Core struct {
	Process Process
	// Threads are the threads, the first being the one a reader shows
	// first (the one that was running, else the group leader).
	Threads []Thread
	// Auxv is the auxiliary vector as the process got it (pairs of
	// 64-bit words, ending with AT_NULL).
	Auxv     []byte
	Files    []File
	Segments []Segment
}

// ELF constants (include/uapi/linux/elf.h).
const (
	ntPRStatus = 1
	ntPRPSInfo = 3
	ntAuxv     = 6
	ntFile     = 0x46494c45

	ehdrSize     = 64
	phdrSize     = 56
	prstatusSize = 336 // struct elf_prstatus on x86-64: gdb's BFD checks it
	prpsinfoSize = 136 // struct elf_prpsinfo on x86-64
	regsOffset   = 112 // pr_reg in elf_prstatus
	pageSize     = 4096

	// Bounds that keep a core's headers sane: ELF's e_phnum is 16 bits
	// (PN_XNUM and a section header would be needed beyond), and NT_FILE
	// paths are PATH_MAX at most.
	maxSegments = 0xfffe
	maxPath     = 4096
)

// ErrTooLarge says a core has more segments than ELF's program header
// count holds.
var ErrTooLarge = errors.New("elfcore: too many segments")

// Write writes c as an ELF core file to w, reading the segments' bytes
// from mem. It returns the number of bytes written.
func Write(w io.Writer, c *Core, mem Memory) (int64, error) {
	if len(c.Threads) == 0 {
		return 0, errors.New("elfcore: a core needs a thread")
	}
	if len(c.Segments)+1 > maxSegments {
		return 0, fmt.Errorf("%w: %d", ErrTooLarge, len(c.Segments))
	}
	for _, s := range c.Segments {
		if s.Addr%pageSize != 0 || s.Size%pageSize != 0 || s.Addr+s.Size < s.Addr {
			return 0, fmt.Errorf("elfcore: segment [%#x, +%#x) is not whole pages", s.Addr, s.Size)
		}
	}
	notes := c.notes()
	phnum := 1 + len(c.Segments)
	notesOff := uint64(ehdrSize + phnum*phdrSize)
	dataOff := alignUp(notesOff+uint64(len(notes)), pageSize)

	bw := &countWriter{w: bufio.NewWriterSize(w, 1<<20)}
	b := binary.LittleEndian
	eh := make([]byte, ehdrSize)
	copy(eh, "\x7fELF")
	eh[4], eh[5], eh[6] = 2, 1, 1 // ELFCLASS64, ELFDATA2LSB, EV_CURRENT
	b.PutUint16(eh[16:], 4)       // ET_CORE
	b.PutUint16(eh[18:], 62)      // EM_X86_64
	b.PutUint32(eh[20:], 1)
	b.PutUint64(eh[32:], ehdrSize) // e_phoff
	b.PutUint16(eh[52:], ehdrSize)
	b.PutUint16(eh[54:], phdrSize)
	b.PutUint16(eh[56:], uint16(phnum))
	bw.Write(eh)

	ph := make([]byte, phdrSize)
	b.PutUint32(ph[0:], 4) // PT_NOTE
	b.PutUint64(ph[8:], notesOff)
	b.PutUint64(ph[32:], uint64(len(notes)))
	b.PutUint64(ph[48:], 4)
	bw.Write(ph)
	off := dataOff
	for _, s := range c.Segments {
		clear(ph)
		b.PutUint32(ph[0:], 1) // PT_LOAD
		b.PutUint32(ph[4:], s.Flags)
		b.PutUint64(ph[8:], off)
		b.PutUint64(ph[16:], s.Addr)
		b.PutUint64(ph[32:], s.Size)
		b.PutUint64(ph[40:], s.Size)
		off += s.Size
		b.PutUint64(ph[48:], pageSize)
		bw.Write(ph)
	}
	bw.Write(notes)
	bw.Write(make([]byte, dataOff-notesOff-uint64(len(notes))))

	buf := make([]byte, 1<<20)
	for _, s := range c.Segments {
		for done := uint64(0); done < s.Size; {
			n := min(uint64(len(buf)), s.Size-done)
			if err := mem.ReadAt(buf[:n], s.Addr+done); err != nil {
				return bw.n, fmt.Errorf("elfcore: read [%#x, +%#x): %w", s.Addr+done, n, err)
			}
			bw.Write(buf[:n])
			done += n
		}
	}
	if bw.err == nil {
		bw.err = bw.w.(*bufio.Writer).Flush()
	}
	return bw.n, bw.err
}

// notes builds the PT_NOTE contents in the kernel's order: the first
// thread's NT_PRSTATUS, then NT_PRPSINFO, NT_AUXV, NT_FILE, then the other
// threads' NT_PRSTATUS.
func (c *Core) notes() []byte {
	var out []byte
	for i, t := range c.Threads {
		out = appendNote(out, ntPRStatus, c.prstatus(t))
		if i == 0 {
			out = appendNote(out, ntPRPSInfo, c.prpsinfo())
			if len(c.Auxv) > 0 {
				out = appendNote(out, ntAuxv, c.Auxv)
			}
			if len(c.Files) > 0 {
				out = appendNote(out, ntFile, c.fileNote())
			}
		}
	}
	return out
}

func (c *Core) prstatus(t Thread) []byte {
	b := make([]byte, prstatusSize)
	le := binary.LittleEndian
	le.PutUint32(b[0:], uint32(t.Signal)) // pr_info.si_signo
	le.PutUint16(b[12:], t.Signal)        // pr_cursig
	le.PutUint32(b[32:], uint32(t.PID))
	le.PutUint32(b[36:], uint32(c.Process.PPID))
	le.PutUint32(b[40:], uint32(c.Process.PGRP))
	le.PutUint32(b[44:], uint32(c.Process.SID))
	r := t.Regs
	for i, v := range []uint64{r.R15, r.R14, r.R13, r.R12, r.BP, r.BX, r.R11, r.R10, r.R9, r.R8,
		r.AX, r.CX, r.DX, r.SI, r.DI, r.OrigAX, r.IP, r.CS, r.Flags, r.SP, r.SS,
		r.FSBase, r.GSBase, r.DS, r.ES, r.FS, r.GS} {
		le.PutUint64(b[regsOffset+8*i:], v)
	}
	return b
}

func (c *Core) prpsinfo() []byte {
	p := c.Process
	b := make([]byte, prpsinfoSize)
	le := binary.LittleEndian
	state := byte(0)
	if i := strings.IndexByte("RSDTZW", p.State); i >= 0 {
		state = byte(i)
	}
	b[0] = state
	b[1] = p.State
	if p.State == 'Z' {
		b[2] = 1
	}
	le.PutUint64(b[8:], p.Flags)
	le.PutUint32(b[16:], p.UID)
	le.PutUint32(b[20:], p.GID)
	le.PutUint32(b[24:], uint32(p.PID))
	le.PutUint32(b[28:], uint32(p.PPID))
	le.PutUint32(b[32:], uint32(p.PGRP))
	le.PutUint32(b[36:], uint32(p.SID))
	copy(b[40:55], p.Name)  // pr_fname[16], NUL-terminated
	copy(b[56:135], p.Args) // pr_psargs[80], NUL-terminated
	return b
}

// fileNote is NT_FILE: count, page size, count triples (start, end, page
// offset), then the paths, NUL-terminated.
func (c *Core) fileNote() []byte {
	le := binary.LittleEndian
	b := le.AppendUint64(nil, uint64(len(c.Files)))
	b = le.AppendUint64(b, pageSize)
	for _, f := range c.Files {
		b = le.AppendUint64(b, f.Start)
		b = le.AppendUint64(b, f.End)
		b = le.AppendUint64(b, f.PgOff)
	}
	for _, f := range c.Files {
		p := f.Path
		if len(p) > maxPath {
			p = p[:maxPath]
		}
		if i := strings.IndexByte(p, 0); i >= 0 {
			p = p[:i]
		}
		b = append(append(b, p...), 0)
	}
	return b
}

// appendNote appends an ELF note named "CORE".
func appendNote(out []byte, typ uint32, desc []byte) []byte {
	le := binary.LittleEndian
	out = le.AppendUint32(out, 5) // "CORE\0"
	out = le.AppendUint32(out, uint32(len(desc)))
	out = le.AppendUint32(out, typ)
	out = append(out, "CORE\x00\x00\x00\x00"...)
	out = append(out, desc...)
	for len(out)%4 != 0 {
		out = append(out, 0)
	}
	return out
}

func alignUp(v, a uint64) uint64 { return (v + a - 1) &^ (a - 1) }

// countWriter counts bytes and keeps the first error, so the writing
// above can go on unchecked and be checked once.
type countWriter struct {
	w   io.Writer
	n   int64
	err error
}

func (c *countWriter) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	c.err = err
	return n, err
}
