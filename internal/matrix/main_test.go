package main

import (
	"strings"
	"testing"
)

func TestRender(t *testing.T) {
	in := `{"qemu":"1:7.2","kernel":"6.1.0-47-amd64","machine":"pc","check":"save, restore, data verified"}
{"qemu":"1:7.2","kernel":"6.1.0-47-amd64","machine":"q35","check":"save, restore, data verified"}
{"qemu":"1:7.2","kernel":"6.1.0-47-amd64","machine":"pc","check":"save, restore, data verified"}
{"qemu":"1:10.0","kernel":"6.12.118+deb12-amd64","machine":"q35","check":"scan against kpageflags"}
`
	got, err := render(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	want := `| QEMU (Debian package) | guest kernel | save, restore, data verified | scan against kpageflags |
|---|---|---|---|
| 1:10.0 | 6.12.118+deb12-amd64 | - | passed (q35) |
| 1:7.2 | 6.1.0-47-amd64 | passed (pc, q35) | - |
`
	if got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
	if _, err := render(strings.NewReader("{not json\n")); err == nil {
		t.Error("a bad record was accepted")
	}
}
