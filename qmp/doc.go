// Package qmp talks to a running QEMU over its QMP monitor socket: the
// handful of commands kvmckpt needs to pause a guest, find its RAM, read the
// CPU state that introspection starts from, and save or load QEMU's device
// state around a checkpoint.
//
// The wire protocol is the QEMU Machine Protocol, docs/interop/qmp-spec.rst
// in the QEMU tree; commands and their replies are the QAPI schema in
// qapi/*.json. kvmckpt is written against QEMU 7.2 and checks what it can at
// run time instead of assuming newer behaviour.
//
// # Why not go-qemu's monitor
//
// The design named github.com/digitalocean/go-qemu for the session. Its
// qmp.SocketMonitor was tried and does not fit: it turns QMP error replies
// into plain strings (the error class is lost, and callers must tell a
// CommandNotFound from a GenericError), reads the greeting with no deadline
// (a socket that is not QMP hangs it), takes no context, and stops at
// replies over 64 KiB (info mtree -f of a guest with many vCPUs is larger).
// So this package speaks the protocol itself (a few hundred lines over
// net.UnixConn, with SCM_RIGHTS for getfd). The test bed's own tests still
// drive QEMU through go-qemu, an independent client, as a cross-check.
//
// # Device state
//
// The guest's RAM lives in a shared file (memory-backend-file, share=on) that
// kvmckpt reads and writes itself. Everything else QEMU knows about the guest
// (CPU registers, device models, ROM and firmware RAM blocks) is saved with a
// migration to a pipe, with the x-ignore-shared capability on, so the stream
// leaves the shared RAM out (migration/ram.c, ramblock_is_ignored). See
// [Session.SaveDeviceState] and [Session.LoadDeviceState].
//
// # Guest-physical layout
//
// QMP has no command that says where a RAM backend appears in the guest's
// physical address space, so [Session.RAMLayout] asks the human monitor for
// the flattened memory map ("info mtree -f", softmmu/memory.c,
// mtree_print_flatview) and keeps the ranges of the system address space
// that belong to a RAM backend.
//
// # Trust
//
// QEMU is trusted to speak QMP, not to be well behaved: a peer that is not
// QEMU, or a QEMU that hangs, must not hang kvmckpt. Every read has a
// deadline or a context, a reply larger than [MaxMessageSize] ends the
// session, and the text parsers bound what they accept and return errors
// rather than panic. They are fuzzed.
//
// A [Session] is safe for concurrent use; QEMU runs the commands one at a
// time in the order they arrive.
package qmp
