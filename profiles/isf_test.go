package profiles

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"
)

// sameShape checks that two profiles of one kernel agree on everything
// both sources know.
func sameShape(t *testing.T, want, got *Profile) {
	t.Helper()
	require.Equal(t, want.Banner, got.Banner)
	require.Equal(t, want.Name, got.Name)
	require.Equal(t, want.Release, got.Release)
	require.Equal(t, want.Structs, got.Structs)
	for name, v := range got.Constants {
		require.Equal(t, want.Constants[name], v, "constant %s", name)
	}
	for name, v := range got.Symbols {
		require.Equal(t, want.Symbols[name], v, "symbol %s", name)
	}
}

func TestFromISFSynthetic(t *testing.T) {
	k := makeSynthKernel(t, synthOpts{prefAddress: true})
	want, err := BuildFromKernelMemory(k.img, k.base, nil)
	require.NoError(t, err)
	spec, err := loadBTF(synthBTF(t))
	require.NoError(t, err)
	isf := isfFromBTF(t, spec, want.Symbols, want.Banner, 1024)

	got, err := FromISF(bytes.NewReader(isf))
	require.NoError(t, err)
	require.Equal(t, "isf", got.Source)
	require.Empty(t, got.BuildID)
	sameShape(t, want, got)

	for _, tc := range []struct {
		name string
		edit func(m map[string]any)
		want error
	}{
		{"no banner", func(m map[string]any) { delete(m["symbols"].(map[string]any), "linux_banner") }, ErrMissingSymbol},
		{"no page", func(m map[string]any) { delete(m["user_types"].(map[string]any), "page") }, ErrMissingType},
		{"no enum", func(m map[string]any) { delete(m["enums"].(map[string]any), "migratetype") }, ErrMissingType},
		{"no node_data", func(m map[string]any) { delete(m["symbols"].(map[string]any), "node_data") }, ErrMissingSymbol},
		{"not an object", func(m map[string]any) { m["symbols"] = 5 }, ErrMalformed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var m map[string]any
			require.NoError(t, json.Unmarshal(isf, &m))
			tc.edit(m)
			b, err := json.Marshal(m)
			require.NoError(t, err)
			_, err = FromISF(bytes.NewReader(b))
			require.ErrorIs(t, err, tc.want)
		})
	}
	_, err = FromISF(bytes.NewReader(isf[:len(isf)/2]))
	require.ErrorIs(t, err, ErrMalformed)
	_, err = fromISF(bytes.NewReader(isf), len(isf)-1)
	require.ErrorIs(t, err, ErrTooLarge)
	gz := gzipBytes(t, isf)
	got, err = fromISF(bytes.NewReader(gz), len(isf))
	require.NoError(t, err)
	sameShape(t, want, got)
	_, err = fromISF(bytes.NewReader(gz), len(isf)-1)
	require.ErrorIs(t, err, ErrTooLarge)
}
