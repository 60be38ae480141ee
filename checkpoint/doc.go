// Package checkpoint runs kvmckpt's operations on a QEMU guest: [Scan],
// [Save], [Restore], [RestoreLaunch], [Inspect], [Verify] and [Resume]. It
// ties together the QMP session (package qmp), the free-page walk (package
// introspect), kernel profiles (package profiles), host-side page
// exclusions (package pagemap) and the checkpoint file (package writer).
//
// A save: take the per-guest lock, note the run state, pause, map the RAM
// files read-only, find the kernel profile (a stored one whose banner is in
// guest memory, else one built from guest memory), walk the free lists,
// drop holes and zero pages, write the used pages (lz4 on every core) and
// QEMU's device state (a migration with x-ignore-shared through a pipe)
// into a temporary file, fsync, rename, fsync the directory, and put the
// guest back in its run state. Every failure and signal leads back to that
// run state with no partial file; see RELIABILITY.md.
//
// A live save (live.go) copies the used pages while the guest runs, in
// pre-copy rounds, and pauses it for the last ones; keyed page hashes
// find the pages written since their copy.
//
// The per-guest lock is an flock on a file named after the QMP socket's
// device and inode ([LockPath]); it also records a pause in progress, so a
// kvmckpt killed while the guest was paused is noticed by the next one.
package checkpoint
