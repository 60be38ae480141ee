package elfcore

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// pattern is memory whose every 8 bytes hold their own address.
type pattern struct{ reads int }

func (p *pattern) ReadAt(b []byte, addr uint64) error {
	p.reads++
	for i := 0; i+8 <= len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], addr+uint64(i))
	}
	return nil
}

func testCore() *Core {
	return &Core{
		Process: Process{PID: 42, PPID: 1, PGRP: 42, SID: 7, UID: 1000, GID: 100, State: 'S',
			Name: "a-very-long-command-name", Args: "prog --flag value"},
		Threads: []Thread{
			{PID: 43, Regs: Regs{IP: 0x401000, SP: 0x7ffc0000, CS: 0x33, SS: 0x2b, FSBase: 0x7f00}},
			{PID: 42, Regs: Regs{IP: 0x401234, SP: 0x7ffd0000, CS: 0x33, SS: 0x2b, AX: 0xfffffffffffffe00}},
		},
		Auxv: binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(
			binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(nil, 6), 4096), 0), 0),
		Files: []File{{Start: 0x400000, End: 0x402000, PgOff: 0, Path: "/bin/prog"},
			{Start: 0x402000, End: 0x403000, PgOff: 2, Path: "/bin/prog"}},
		Segments: []Segment{
			{Addr: 0x400000, Size: 0x2000, Flags: FlagR | FlagX},
			{Addr: 0x7ffc0000, Size: 0x21000, Flags: FlagR | FlagW},
		},
	}
}

// TestWriteReadBack writes a core and reads it back with debug/elf: the
// program headers, every note (in the kernel's order, with the sizes
// gdb's BFD checks) and the bytes of each present segment.
func TestWriteReadBack(t *testing.T) {
	c := testCore()
	var buf bytes.Buffer
	n, err := Write(&buf, c, &pattern{})
	require.NoError(t, err)
	require.Equal(t, int64(buf.Len()), n)

	f, err := elf.NewFile(bytes.NewReader(buf.Bytes()))
	require.NoError(t, err)
	assert.Equal(t, elf.ET_CORE, f.Type)
	assert.Equal(t, elf.EM_X86_64, f.Machine)
	require.Len(t, f.Progs, 1+len(c.Segments))
	require.Equal(t, elf.PT_NOTE, f.Progs[0].Type)
	for i, s := range c.Segments {
		p := f.Progs[i+1]
		assert.Equal(t, elf.PT_LOAD, p.Type)
		assert.Equal(t, s.Addr, p.Vaddr)
		assert.Equal(t, s.Size, p.Memsz)
		assert.Equal(t, elf.ProgFlag(s.Flags), p.Flags)
		require.Equal(t, s.Size, p.Filesz)
		assert.Zero(t, p.Off%pageSize)
		data := make([]byte, p.Filesz)
		_, err := p.ReadAt(data, 0)
		require.NoError(t, err)
		for i := 0; i < len(data); i += 4096 {
			require.Equal(t, s.Addr+uint64(i), binary.LittleEndian.Uint64(data[i:]))
		}
	}

	notes := readNotes(t, f.Progs[0])
	var types []uint32
	for _, n := range notes {
		assert.Equal(t, "CORE", n.name)
		types = append(types, n.typ)
	}
	require.Equal(t, []uint32{ntPRStatus, ntPRPSInfo, ntAuxv, ntFile, ntPRStatus}, types)
	le := binary.LittleEndian
	for i, idx := range []int{0, 4} {
		st := notes[idx].desc
		require.Len(t, st, prstatusSize)
		th := c.Threads[i]
		assert.Equal(t, uint32(th.PID), le.Uint32(st[32:]))
		assert.Equal(t, uint32(1), le.Uint32(st[36:]), "ppid")
		assert.Equal(t, uint32(7), le.Uint32(st[44:]), "sid")
		assert.Equal(t, th.Regs.IP, le.Uint64(st[regsOffset+16*8:]), "rip is word 16")
		assert.Equal(t, th.Regs.SP, le.Uint64(st[regsOffset+19*8:]), "rsp is word 19")
		assert.Equal(t, th.Regs.FSBase, le.Uint64(st[regsOffset+21*8:]), "fs_base is word 21")
		assert.Equal(t, th.Regs.AX, le.Uint64(st[regsOffset+10*8:]), "rax is word 10")
	}
	ps := notes[1].desc
	require.Len(t, ps, prpsinfoSize)
	assert.Equal(t, byte('S'), ps[1])
	assert.Equal(t, uint32(1000), le.Uint32(ps[16:]))
	assert.Equal(t, uint32(42), le.Uint32(ps[24:]))
	assert.Equal(t, "a-very-long-com", cstring(ps[40:56]), "pr_fname keeps 15 bytes")
	assert.Equal(t, "prog --flag value", cstring(ps[56:136]))
	assert.Equal(t, c.Auxv, notes[2].desc)

	fn := notes[3].desc
	require.Equal(t, uint64(2), le.Uint64(fn[0:]))
	require.Equal(t, uint64(4096), le.Uint64(fn[8:]))
	assert.Equal(t, []uint64{0x400000, 0x402000, 0, 0x402000, 0x403000, 2},
		[]uint64{le.Uint64(fn[16:]), le.Uint64(fn[24:]), le.Uint64(fn[32:]), le.Uint64(fn[40:]), le.Uint64(fn[48:]), le.Uint64(fn[56:])})
	assert.Equal(t, "/bin/prog\x00/bin/prog\x00", string(fn[64:]))
}

// TestWriteRefuses: what cannot be a core is refused before a byte is
// written, and a read failure is reported.
func TestWriteRefuses(t *testing.T) {
	var buf bytes.Buffer
	_, err := Write(&buf, &Core{}, &pattern{})
	require.Error(t, err)
	c := testCore()
	c.Segments = append(c.Segments, Segment{Addr: 0x1001, Size: 4096})
	_, err = Write(&buf, c, &pattern{})
	require.ErrorContains(t, err, "whole pages")
	require.Zero(t, buf.Len())
	c = testCore()
	c.Segments = make([]Segment, maxSegments)
	_, err = Write(&buf, c, &pattern{})
	require.ErrorIs(t, err, ErrTooLarge)

	_, err = Write(&buf, testCore(), failing{})
	require.ErrorContains(t, err, "gone")
}

type failing struct{}

func (failing) ReadAt([]byte, uint64) error { return errors.New("gone") }

type note struct {
	name string
	typ  uint32
	desc []byte
}

func readNotes(t *testing.T, p *elf.Prog) []note {
	t.Helper()
	b := make([]byte, p.Filesz)
	_, err := p.ReadAt(b, 0)
	require.NoError(t, err)
	var out []note
	le := binary.LittleEndian
	for len(b) > 0 {
		require.GreaterOrEqual(t, len(b), 12)
		nsz, dsz, typ := le.Uint32(b), le.Uint32(b[4:]), le.Uint32(b[8:])
		b = b[12:]
		nameEnd := (int(nsz) + 3) &^ 3
		name := cstring(b[:nsz])
		b = b[nameEnd:]
		descEnd := (int(dsz) + 3) &^ 3
		out = append(out, note{name, typ, b[:dsz]})
		b = b[descEnd:]
	}
	return out
}

func cstring(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}
