package qmp

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestDialLibvirtRefuses covers what is refused before libvirt is asked:
// a domain that is not running here, a remote connection (the RAM is read
// from the local QEMU process), a name that is a path.
func TestDialLibvirtRefuses(t *testing.T) {
	ctx := context.Background()
	_, err := DialLibvirt(ctx, "qemu:///system", "kvmckpt-no-such-domain")
	require.ErrorIs(t, err, ErrLibvirt)
	assert.Contains(t, err.Error(), "is domain \"kvmckpt-no-such-domain\" running")
	_, err = DialLibvirt(ctx, "qemu+ssh://elsewhere/system", "vm")
	require.ErrorIs(t, err, ErrLibvirt)
	assert.Contains(t, err.Error(), "runs on the domain's host")
	_, err = DialLibvirt(ctx, "", "../etc/x")
	require.ErrorIs(t, err, ErrLibvirt)
}
