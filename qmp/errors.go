package qmp

import (
	"errors"
	"fmt"
)

var (
	// ErrNotQMP means the peer did not open with a QMP greeting or did not
	// accept the capabilities negotiation.
	ErrNotQMP = errors.New("not a QMP monitor")
	// ErrTimeout means QEMU did not answer before a deadline.
	ErrTimeout = errors.New("QMP timeout")
	// ErrClosed means the monitor connection is gone: closed by [Session.Close],
	// or by QEMU, which closes it when it exits.
	ErrClosed = errors.New("QMP connection closed")
	// ErrMalformed means QEMU's reply or human-monitor output was not in the
	// expected form.
	ErrMalformed = errors.New("malformed monitor output")
	// ErrNoRAM means no RAM backend is mapped into the guest's system
	// address space.
	ErrNoRAM = errors.New("no RAM backend mapped")
	// ErrNotSaveable means the guest's run state does not allow a
	// checkpoint; see [Status.CheckSaveable].
	ErrNotSaveable = errors.New("guest state cannot be saved")
	// ErrNotIncoming means QEMU was not started with -incoming defer, or
	// has already loaded a state.
	ErrNotIncoming = errors.New("QEMU is not waiting for an incoming migration")
	// ErrMigrationFailed means QEMU reported a failed or cancelled migration,
	// or exited during one.
	ErrMigrationFailed = errors.New("migration failed")
	// ErrCapability means a migration capability is on that the pipe
	// transport kvmckpt uses cannot work with.
	ErrCapability = errors.New("incompatible migration capability")
)

// Error classes QEMU uses in error replies (qapi/error.json, QapiErrorClass).
const (
	ClassGenericError    = "GenericError"
	ClassCommandNotFound = "CommandNotFound"
	ClassDeviceNotActive = "DeviceNotActive"
	ClassDeviceNotFound  = "DeviceNotFound"
	ClassKVMMissingCap   = "KVMMissingCap"
)

// Error is an error reply from QEMU. Class is QEMU's error class, which is
// stable; Desc is free text for humans.
type Error struct {
	// Command is the QMP command that failed.
	Command string
	// Class is the error class, for example [ClassGenericError].
	Class string
	// Desc is QEMU's description of the error.
	Desc string
}

func (e *Error) Error() string {
	return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc)
}
