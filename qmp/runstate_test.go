package qmp

import (
	"errors"
	"testing"
)

func TestCheckSaveable(t *testing.T) {
	tests := []struct {
		state string
		ok    bool
	}{
		{"running", true},
		{"paused", true},
		{"prelaunch", true},
		{"postmigrate", false},
		{"suspended", true},
		{"guest-panicked", true},
		{"inmigrate", false},
		{"finish-migrate", false},
		{"save-vm", false},
		{"restore-vm", false},
		{"internal-error", false},
		{"shutdown", false},
		{"colo", false},
		{"", false},
		{"no-such-state", false},
	}
	for _, tt := range tests {
		err := Status{State: tt.state}.CheckSaveable()
		if tt.ok && err != nil {
			t.Errorf("%q: %v", tt.state, err)
		}
		if !tt.ok && !errors.Is(err, ErrNotSaveable) {
			t.Errorf("%q: got %v, want ErrNotSaveable", tt.state, err)
		}
	}
}
