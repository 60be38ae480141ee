// Package ramblock opens the blocks of a guest's RAM where the host holds
// them, so that the rest of kvmckpt reads and writes guest RAM the same
// way whatever QEMU was told:
//
//   - a file QEMU maps shared (memory-backend-file with share=on, or a
//     memfd: memory-backend-memfd, libvirt's memfd source), which kvmckpt
//     maps too: [OpenFile], or [Locate] through /proc/PID/fd;
//   - QEMU's own memory (memory-backend-ram, QEMU's default RAM, and any
//     backend mapped private), read and written with process_vm_readv and
//     process_vm_writev: [Locate].
//
// [Locate] finds a block by its host virtual address in the QEMU process
// (HMP gpa2hva gives it) and checks it against /proc/PID/maps: the whole
// block must lie in mappings of one kind, or it is refused.
//
// A [Block] is also an introspect.Backend: a process's memory is copied
// into a private mirror on first access, 64 KiB at a time, so that
// introspection's reads cost one system call per chunk, not per field.
// Bulk reads (the checkpoint's pages) go through ReadAt and are not
// mirrored.
//
// Guest RAM is untrusted input; this package only moves bytes. Reading
// another process's memory needs the right to ptrace it (root, or the
// same user where Yama allows it).
package ramblock
