package qmp

import (
	"context"
	"errors"
	"fmt"
)

// ErrNoBalloon means the guest has no virtio balloon QEMU can use: no
// device, or a guest whose driver has not set it up.
var ErrNoBalloon = errors.New("no active balloon")

// BalloonActual returns the guest's memory size as its balloon leaves it
// (query-balloon's actual): the RAM size less what the guest gave to the
// balloon, as far as the guest reported it. A guest without a balloon
// device (or whose driver is not loaded) gives an error wrapping
// [ErrNoBalloon].
func (s *Session) BalloonActual(ctx context.Context) (uint64, error) {
	var r struct {
		Actual *int64 `json:"actual"`
	}
	if err := s.Run(ctx, "query-balloon", nil, &r); err != nil {
		var qe *Error
		if errors.As(err, &qe) && qe.Class == ClassDeviceNotActive {
			return 0, fmt.Errorf("%w: %w", ErrNoBalloon, err)
		}
		return 0, fmt.Errorf("query balloon: %w", err)
	}
	if r.Actual == nil || *r.Actual < 0 {
		return 0, fmt.Errorf("query balloon: %w: no actual size", ErrMalformed)
	}
	return uint64(*r.Actual), nil
}

// SetBalloon asks the guest to bring its memory to target bytes (the
// balloon command): the guest inflates or deflates its balloon in its own
// time; watch [Session.BalloonActual].
func (s *Session) SetBalloon(ctx context.Context, target uint64) error {
	if target == 0 || target > 1<<62 {
		return fmt.Errorf("balloon: invalid target %d", target)
	}
	if err := s.Run(ctx, "balloon", map[string]any{"value": target}, nil); err != nil {
		var qe *Error
		if errors.As(err, &qe) && qe.Class == ClassDeviceNotActive {
			return fmt.Errorf("%w: %w", ErrNoBalloon, err)
		}
		return fmt.Errorf("balloon: %w", err)
	}
	return nil
}
