package main

import (
	"context"
	"errors"

	"github.com/kvmckpt/kvmckpt/checkpoint"
)

// Exit codes; see the package doc.
const (
	exitOK          = 0
	exitFailed      = 1
	exitUsage       = 2
	exitInvalid     = 3
	exitBusy        = 4
	exitInterrupted = 130
)

func exitCode(ctx context.Context, err error) int {
	var ue *usageError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ue):
		return exitUsage
	case errors.Is(err, checkpoint.ErrInvalid):
		return exitInvalid
	case errors.Is(err, checkpoint.ErrBusy), errors.Is(err, checkpoint.ErrGuestState):
		return exitBusy
	case ctx.Err() != nil || errors.Is(err, context.Canceled):
		return exitInterrupted
	}
	return exitFailed
}
