package introspect

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// What a process's core is made of beyond its tasks and VMAs: its
// auxiliary vector, process group and session, the paths of its mapped
// files, its vDSO and its memory as its page tables map it.

// Bounds of the walks below; the kernel's own limits.
const (
	maxPathLen   = 4096 // PATH_MAX
	maxNameLen   = 255  // NAME_MAX
	maxPathDepth = maxPathLen / 2
	maxVDSOSize  = 1 << 20
	// pidTypeMax is PIDTYPE_MAX (enum pid_type: PID, TGID, PGID, SID),
	// checked against the length of signal_struct.pids.
	pidTypePGID, pidTypeSID, pidTypeMax = 2, 3, 4
	// atNull ends the auxiliary vector.
	atNull = 0
)

// ProcessIDs are a process's ids beyond its task's.
type ProcessIDs struct {
	// PGRP and SID are the process group and session ids in the initial
	// namespace; GID the real group id.
	PGRP, SID int32
	GID       uint32
}

// ProcessIDs reads the process group, session and group id of t's
// process.
func (k *Kernel) ProcessIDs(t Task) (ProcessIDs, error) {
	p := k.Profile
	var missing []string
	field := func(st, f string, width uint64) uint64 { return fieldOffset(p, &missing, st, f, width) }
	signal := field("task_struct", "signal", 8)
	cred := field("task_struct", "real_cred", 8)
	gid := field("cred", "gid", 4)
	pids := field("signal_struct", "pids", 8*pidTypeMax)
	nr := field("upid", "nr", 4)
	numbers := field("pid", "numbers", 0)
	if f := p.Structs["signal_struct"].Fields["pids"]; f.Count != pidTypeMax {
		missing = append(missing, fmt.Sprintf("signal_struct.pids of %d, not PIDTYPE_MAX %d", f.Count, pidTypeMax))
	}
	if len(missing) > 0 {
		return ProcessIDs{}, fmt.Errorf("%w: %v", ErrProfile, missing)
	}
	var out ProcessIDs
	var err error
	read := func(va VAddr) uint64 {
		v, e := k.Uint64(va)
		err = errors.Join(err, e)
		return v
	}
	sig := VAddr(read(t.Addr + VAddr(signal)))
	c := VAddr(read(t.Addr + VAddr(cred)))
	if err != nil || sig == 0 || c == 0 {
		return out, fmt.Errorf("%w: pid %d: signal or cred: %v", ErrKernel, t.PID, err)
	}
	g, err := k.Uint32(c + VAddr(gid))
	if err != nil {
		return out, fmt.Errorf("%w: pid %d: cred: %w", ErrKernel, t.PID, err)
	}
	out.GID = g
	for _, x := range []struct {
		typ uint64
		dst *int32
	}{{pidTypePGID, &out.PGRP}, {pidTypeSID, &out.SID}} {
		pid := VAddr(read(sig + VAddr(pids+8*x.typ)))
		if err != nil {
			return out, fmt.Errorf("%w: pid %d: signal's pids: %w", ErrKernel, t.PID, err)
		}
		if pid == 0 {
			continue
		}
		n, err := k.Uint32(pid + VAddr(numbers+nr)) // numbers[0]: the initial namespace
		if err != nil {
			return out, fmt.Errorf("%w: pid %d: struct pid: %w", ErrKernel, t.PID, err)
		}
		*x.dst = int32(n)
	}
	return out, nil
}

// Auxv returns the auxiliary vector t's process was started with
// (mm->saved_auxv): pairs of 64-bit words up to and including AT_NULL.
// A vector without its AT_NULL in the array is an error.
func (k *Kernel) Auxv(t Task) ([]byte, error) {
	f, ok := k.Profile.Structs["mm_struct"].Fields["saved_auxv"]
	if !ok || f.Count == 0 || f.Size != f.Count*8 || f.Count%2 != 0 || f.Offset+f.Size > k.Profile.Structs["mm_struct"].Size {
		return nil, fmt.Errorf("%w: mm_struct.saved_auxv is not an array of longs", ErrProfile)
	}
	if t.MM == 0 {
		return nil, nil
	}
	b := make([]byte, f.Size)
	if err := k.ReadVirt(b, t.MM+VAddr(f.Offset)); err != nil {
		return nil, fmt.Errorf("%w: pid %d: saved_auxv: %w", ErrKernel, t.PID, err)
	}
	for i := 0; i+16 <= len(b); i += 16 {
		if binary.LittleEndian.Uint64(b[i:]) == atNull {
			return b[:i+16], nil
		}
	}
	return nil, fmt.Errorf("%w: pid %d: saved_auxv has no AT_NULL", ErrKernel, t.PID)
}

// FilePath returns the path of the open file at file (struct file) from
// the root of the mount tree, as d_path prints it for a process at the
// global root, without d_path's " (deleted)" suffix. The names are the
// guest's: untrusted text. The walk is bounded by PATH_MAX.
func (k *Kernel) FilePath(file VAddr) (string, error) {
	p := k.Profile
	var missing []string
	field := func(st, f string, width uint64) uint64 { return fieldOffset(p, &missing, st, f, width) }
	fMnt := field("file", "f_path.mnt", 8)
	fDentry := field("file", "f_path.dentry", 8)
	dParent := field("dentry", "d_parent", 8)
	dLen := field("dentry", "d_name.len", 4)
	dName := field("dentry", "d_name.name", 8)
	mMnt := field("mount", "mnt", 8)
	mRoot := field("mount", "mnt.mnt_root", 8)
	mParent := field("mount", "mnt_parent", 8)
	mPoint := field("mount", "mnt_mountpoint", 8)
	if len(missing) > 0 {
		return "", fmt.Errorf("%w: the profile lacks what file paths are read with (%v)", ErrProfile, missing)
	}
	var err error
	read := func(va VAddr) VAddr {
		v, e := k.Uint64(va)
		if err == nil && e == nil && (v < 1<<63 || v%8 != 0) {
			e = fmt.Errorf("%#x at %#x is no kernel pointer", v, uint64(va))
		}
		err = cmp.Or(err, e)
		return VAddr(v)
	}
	vfsmnt := read(file + VAddr(fMnt))
	dentry := read(file + VAddr(fDentry))
	mount := vfsmnt - VAddr(mMnt)
	var names []string
	total := 0
	for depth := 0; err == nil; depth++ {
		if depth > maxPathDepth {
			return "", fmt.Errorf("%w: file at %#x: a path deeper than %d", ErrKernel, uint64(file), maxPathDepth)
		}
		root := read(mount + VAddr(mRoot))
		parent := read(dentry + VAddr(dParent))
		if err != nil {
			break
		}
		if dentry == root || dentry == parent {
			up := read(mount + VAddr(mParent))
			if err != nil || up == mount || dentry != root {
				break // the root of the mount tree, or of a pseudo file system
			}
			dentry, mount = read(mount+VAddr(mPoint)), up
			continue
		}
		n, e := k.Uint32(dentry + VAddr(dLen))
		if e != nil || n == 0 || n > maxNameLen {
			err = cmp.Or(e, fmt.Errorf("a name of %d bytes", n))
			break
		}
		if total += int(n) + 1; total > maxPathLen {
			return "", fmt.Errorf("%w: file at %#x: a path longer than PATH_MAX", ErrKernel, uint64(file))
		}
		name := make([]byte, n)
		if err = k.ReadVirt(name, read(dentry+VAddr(dName))); err != nil {
			break
		}
		names = append(names, string(name))
		dentry = parent
	}
	if err != nil {
		return "", fmt.Errorf("%w: path of file at %#x: %w", ErrKernel, uint64(file), err)
	}
	slices.Reverse(names)
	return "/" + strings.Join(names, "/"), nil
}

// VDSO returns where t's process has its vDSO mapped (mm->context.vdso)
// and the kernel's image of it (context.vdso_image): the pages a process
// maps only when it first touches them, so the image is their content.
// addr is 0 for a process without one.
func (k *Kernel) VDSO(t Task) (addr uint64, image []byte, err error) {
	p := k.Profile
	var missing []string
	field := func(st, f string, width uint64) uint64 { return fieldOffset(p, &missing, st, f, width) }
	vdso := field("mm_struct", "context.vdso", 8)
	img := field("mm_struct", "context.vdso_image", 8)
	data := field("vdso_image", "data", 8)
	size := field("vdso_image", "size", 8)
	if len(missing) > 0 {
		return 0, nil, fmt.Errorf("%w: %v", ErrProfile, missing)
	}
	if t.MM == 0 {
		return 0, nil, nil
	}
	a, err1 := k.Uint64(t.MM + VAddr(vdso))
	im, err2 := k.Uint64(t.MM + VAddr(img))
	if err := errors.Join(err1, err2); err != nil {
		return 0, nil, fmt.Errorf("%w: pid %d: mm's vdso: %w", ErrKernel, t.PID, err)
	}
	if a == 0 || im == 0 {
		return 0, nil, nil
	}
	d, err1 := k.Uint64(VAddr(im + data))
	n, err2 := k.Uint64(VAddr(im + size))
	if err := errors.Join(err1, err2); err != nil {
		return 0, nil, fmt.Errorf("%w: pid %d: vdso_image: %w", ErrKernel, t.PID, err)
	}
	if a%PageSize != 0 || a >= 1<<63 || n == 0 || n%PageSize != 0 || n > maxVDSOSize {
		return 0, nil, fmt.Errorf("%w: pid %d: a vDSO of %d bytes at %#x", ErrKernel, t.PID, n, a)
	}
	image = make([]byte, n)
	if err := k.ReadVirt(image, VAddr(d)); err != nil {
		return 0, nil, fmt.Errorf("%w: pid %d: vDSO image: %w", ErrKernel, t.PID, err)
	}
	if string(image[:4]) != "\x7fELF" {
		return 0, nil, fmt.Errorf("%w: pid %d: the vDSO image at %#x is no ELF file", ErrKernel, t.PID, d)
	}
	return a, image, nil
}

// UserMemory is a process's memory as its page tables map it.
type UserMemory struct {
	tr *Translator
}

// UserMemory returns t's process's memory.
func (k *Kernel) UserMemory(t Task) (*UserMemory, error) {
	if t.MM == 0 || t.KernelThread {
		return nil, fmt.Errorf("pid %d (%s) has no user memory", t.PID, t.Comm)
	}
	l, err := resolveTaskLayout(k.Profile)
	if err != nil {
		return nil, err
	}
	tr, err := k.userTranslator(l, t.MM)
	if err != nil {
		return nil, fmt.Errorf("%w: pid %d: %w", ErrKernel, t.PID, err)
	}
	return &UserMemory{tr: tr}, nil
}

// Present returns the runs of [start, end) whose pages are mapped (PROT_NONE
// pages too) and whose bytes guest memory holds: a page swapped out, never
// touched, or absent from a checkpoint is in no run.
func (u *UserMemory) Present(start, end uint64) ([]VAddrRange, error) {
	var out []VAddrRange
	add := func(va VAddr) {
		if n := len(out); n > 0 && out[n-1].End == va {
			out[n-1].End += PageSize
			return
		}
		out = append(out, VAddrRange{va, va + PageSize})
	}
	err := u.tr.Walk(VAddr(start), VAddr(end), func(va VAddr, pa PAddr, size uint64) bool {
		for off := uint64(0); off < size; off += PageSize {
			if _, ok := u.tr.Mem.Slice(pa+PAddr(off), PageSize); ok {
				add(va + VAddr(off))
			}
		}
		return true
	})
	return out, err
}

// ReadAt reads the process's memory at addr into p; every page of it must
// be present.
func (u *UserMemory) ReadAt(p []byte, addr uint64) error {
	n, err := u.tr.ReadVirt(p, VAddr(addr))
	if err == nil && n < len(p) {
		err = fmt.Errorf("read %d of %d bytes at %#x", n, len(p), addr)
	}
	return err
}

// Root is the physical address of the process's top-level page table.
func (u *UserMemory) Root() PAddr { return u.tr.Root }
