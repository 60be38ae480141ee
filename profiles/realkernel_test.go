package profiles

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/ulikunitz/xz"
)

var update = flag.Bool("update", false, "rewrite the profile fixtures in testdata/profiles from the real kernels")

// Profiles of the real kernels, committed so that tests run without them.
// Regenerate with: go test ./profiles -run TestRealKernels -update
var savedProfiles = map[string]string{
	"amd64":       "6.1.0-47-amd64-322f4442.json",
	"cloud-amd64": "6.1.0-47-cloud-amd64-6c6fdd2e.json",
}

// isfFixture is an ISF in dwarf2json's conventions generated from the
// amd64 kernel's BTF (see isfFromBTF), xz-compressed as Volatility ships
// ISF files.
const isfFixture = "isf-6.1.0-47-amd64.json.xz"

// openKernelVmlinux decompresses a real kernel to its ELF vmlinux.
func openKernelVmlinux(t *testing.T, flavor string) *elf.File {
	t.Helper()
	f, err := os.Open(RequiresKernel(t, flavor))
	require.NoError(t, err)
	defer f.Close()
	fi, err := f.Stat()
	require.NoError(t, err)
	ef, pref, err := openKernelELF(f, fi.Size(), maxVmlinux)
	require.NoError(t, err)
	require.Equal(t, uint64(0x1000000), pref)
	return ef
}

func TestRealKernels(t *testing.T) {
	for _, flavor := range []string{"amd64", "cloud-amd64"} {
		t.Run(flavor, func(t *testing.T) {
			p := kernelProfile(t, flavor)
			require.Equal(t, "image", p.Source)
			require.Regexp(t, `^Linux version 6\.1\.0-47-`+flavor+` \(debian-kernel@lists\.debian\.org\)`, p.Banner)
			require.Equal(t, "6.1.0-47-"+flavor, p.Release)
			require.Equal(t, savedProfiles[flavor], p.Name+".json")
			require.Len(t, p.BuildID, 40)
			require.Equal(t, uint64(0xffffffff81000000), p.Symbols["_text"])
			for _, s := range append(requiredSymbols, "init_top_pgt", "node_states", "__cpu_online_mask",
				"vmalloc_base", "_totalram_pages", "init_on_free", "init_on_alloc", "phys_base",
				"vmcoreinfo_data", "vmcoreinfo_note", "__start_BTF", "__stop_BTF", "_stext", "_etext", "_end",
				"kallsyms_offsets", "kallsyms_relative_base", "kallsyms_num_syms", "kallsyms_names",
				"kallsyms_markers", "kallsyms_token_table", "kallsyms_token_index") {
				require.NotZero(t, p.Symbols[s], "symbol %s", s)
			}
			require.Zero(t, p.Symbols["init_top_pgt"]%4096)
			// 6.1 with CONFIG_PAGE_POISONING (amd64 only).
			_, poison := p.Symbols["_page_poisoning_enabled"]
			require.Equal(t, flavor == "amd64", poison)
			// Debian 6.1.170 carries kallsyms_seqs_of_names (6.2's layout).
			require.NotZero(t, p.Symbols["kallsyms_seqs_of_names"])
			checkLayout61(t, p)
			require.Equal(t, int64(1024), p.Constants["MAX_NUMNODES"]) // CONFIG_NODES_SHIFT=10
			require.Equal(t, []string{"PAGEBLOCK_ORDER", "PAGE_ALLOC_COSTLY_ORDER", "PAGE_BUDDY_MAPCOUNT_VALUE", "PAGE_OFFLINE_MAPCOUNT_VALUE"}, p.Defaults)
			// Measured: 94105 (amd64), 87186 (cloud-amd64).
			require.Greater(t, p.Constants["KALLSYMS_NUM_SYMS"], int64(80000))

			// What the kernel would write into vmcoreinfo agrees with BTF.
			vi, err := parseVmcoreinfo(synthVmcoreinfo(&synthKernel{syms: p.Symbols}, 0, map[string]string{
				"OSRELEASE": p.Release, "BUILD-ID": p.BuildID,
				"SIZE(pglist_data)": "174208", "OFFSET(pglist_data.nr_zones)": "171552",
				"OFFSET(pglist_data.node_start_pfn)": "171560", "OFFSET(pglist_data.node_spanned_pages)": "171576",
				"OFFSET(pglist_data.node_id)": "171584",
			}))
			require.NoError(t, err)
			require.NoError(t, vi.crossCheck(p))

			// The ELF section headers place .BTF and .notes where kallsyms says.
			ef := openKernelVmlinux(t, flavor)
			require.Equal(t, ef.Section(".BTF").Addr, p.Symbols["__start_BTF"])
			require.Equal(t, ef.Section(".BTF").Addr+ef.Section(".BTF").Size, p.Symbols["__stop_BTF"])
			require.Equal(t, ef.Section(".notes").Addr, p.Symbols["__start_notes"])

			if *update {
				var b bytes.Buffer
				require.NoError(t, p.Encode(&b))
				require.Less(t, b.Len(), 200<<10)
				require.NoError(t, os.WriteFile(filepath.Join(testdataDir, savedProfiles[flavor]), b.Bytes(), 0o644))
			}
			saved, err := Decode(bytes.NewReader(readTestdata(t, savedProfiles[flavor])))
			require.NoError(t, err)
			require.Equal(t, p, saved, "testdata/profiles/%s is stale: rerun with -update", savedProfiles[flavor])
		})
	}
}

// TestRealKernelMemory relocates the amd64 kernel as KASLR would and builds
// from "guest memory": only kallsyms_relative_base changes for the
// decoder, and boot_params holds the setup header's pref_address.
func TestRealKernelMemory(t *testing.T) {
	want := kernelProfile(t, "amd64")
	in, err := inputFromELF(openKernelVmlinux(t, "amd64"))
	require.NoError(t, err)
	const delta = 0x1e600000
	img := bytes.Clone(in.img.data)
	rb := want.Symbols["kallsyms_relative_base"] - in.img.base
	binary.LittleEndian.PutUint64(img[rb:], binary.LittleEndian.Uint64(img[rb:])+delta)
	binary.LittleEndian.PutUint64(img[want.Symbols["boot_params"]-in.img.base+0x258:], 0x1000000)

	for _, tc := range []struct {
		name       string
		vmcoreinfo []byte
	}{
		{"boot_params", nil},
		{"vmcoreinfo", []byte("OSRELEASE=6.1.0-47-amd64\nPAGESIZE=4096\nKERNELOFFSET=1e600000\nSIZE(page)=64\nOFFSET(page.lru)=8\nLENGTH(zone.free_area)=11\nNUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-129\n")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := BuildFromKernelMemory(img, in.img.base+delta, tc.vmcoreinfo)
			require.NoError(t, err)
			require.Equal(t, want.Symbols, p.Symbols)
			require.Equal(t, want.Structs, p.Structs)
			require.Equal(t, want.BuildID, p.BuildID)
			require.Equal(t, want.Name, p.Name)
			require.Equal(t, want.Constants, p.Constants)
		})
	}
}

func TestRealKernelISF(t *testing.T) {
	want := kernelProfile(t, "amd64")
	if *update {
		in, err := inputFromELF(openKernelVmlinux(t, "amd64"))
		require.NoError(t, err)
		spec, err := loadBTF(in.elfBTF)
		require.NoError(t, err)
		isf := isfFromBTF(t, spec, want.Symbols, want.Banner, int(want.Constants["MAX_NUMNODES"]))
		var b bytes.Buffer
		w, err := xz.NewWriter(&b)
		require.NoError(t, err)
		_, err = w.Write(isf)
		require.NoError(t, err)
		require.NoError(t, w.Close())
		require.NoError(t, os.WriteFile(filepath.Join(testdataDir, isfFixture), b.Bytes(), 0o644))
	}
	got, err := FromISF(bytes.NewReader(readTestdata(t, isfFixture)))
	require.NoError(t, err)
	sameShape(t, want, got)
}

// TestSavedProfiles runs without the kernels: the committed profiles
// decode, and the committed ISF gives the same layout.
func TestSavedProfiles(t *testing.T) {
	for flavor, file := range savedProfiles {
		t.Run(flavor, func(t *testing.T) {
			p, err := Decode(bytes.NewReader(readTestdata(t, file)))
			require.NoError(t, err)
			require.Equal(t, file, p.Name+".json")
			checkLayout61(t, p)
			if flavor == "amd64" {
				isf, err := FromISF(bytes.NewReader(readTestdata(t, isfFixture)))
				require.NoError(t, err)
				sameShape(t, p, isf)
			}
		})
	}
}

func BenchmarkBuildFromImage(b *testing.B) {
	for _, flavor := range []string{"amd64", "cloud-amd64"} {
		b.Run(flavor, func(b *testing.B) {
			path := RequiresKernel(b, flavor)
			for b.Loop() {
				if _, err := BuildFromImage(path); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestRealKernel612 builds the profiles of Debian's 6.12 kernels from their
// images: what changed since 6.1 comes from BTF, with no version table.
// The page type is the top byte of page_type since 6.12 (enum pagetype,
// PGTY_buddy = 0xf0), which BTF gives even without vmcoreinfo.
func TestRealKernel612(t *testing.T) {
	for _, flavor := range []string{"6.12-amd64", "6.12-cloud-amd64"} {
		t.Run(flavor, func(t *testing.T) {
			p := kernelProfile(t, flavor)
			require.Regexp(t, `^Linux version 6\.12\.`, p.Banner)
			require.NoError(t, p.Validate())
			require.Equal(t, int64(int32(-0x10000000)), p.Constants["PAGE_BUDDY_MAPCOUNT_VALUE"], "PGTY_buddy << 24")
			require.Equal(t, int64(int32(-0x0f000000)), p.Constants["PAGE_OFFLINE_MAPCOUNT_VALUE"], "PGTY_offline << 24")
			require.NotContains(t, p.Defaults, "PAGE_BUDDY_MAPCOUNT_VALUE")
			require.Equal(t, int64(11), p.Constants["MAX_ORDER"], "NR_PAGE_ORDERS")
			require.Equal(t, int64(14), p.Constants["NR_PCP_LISTS"], "3 migrate types x 4 orders + 2 THP lists")
		})
	}
	t.Run("6.1 keeps its encoding", func(t *testing.T) {
		p := kernelProfile(t, "amd64")
		require.Equal(t, int64(-129), p.Constants["PAGE_BUDDY_MAPCOUNT_VALUE"], "~PG_buddy")
		require.Equal(t, int64(-257), p.Constants["PAGE_OFFLINE_MAPCOUNT_VALUE"], "~PG_offline")
	})
}

// TestRealKernelTasks checks that the profiles of Debian's 6.1 and 6.12
// kernels carry the task structures `kvmckpt ps` reads, at the offsets
// their BTF gave when this test was written (a change means the
// flattening changed), and
// that task_struct's nesting did not push fields past maxFields.
func TestRealKernelTasks(t *testing.T) {
	for _, c := range []struct {
		flavor                  string
		tasks, threadNode, comm uint64
		rssStatCount            uint64 // 0: struct mm_rss_stat (6.1); else percpu_counter[4]
	}{
		{"amd64", 2192, 2608, 2976, 0},
		{"6.12-amd64", 0, 0, 0, 4},
	} {
		t.Run(c.flavor, func(t *testing.T) {
			p := kernelProfile(t, c.flavor)
			require.NoError(t, p.Validate())
			for _, w := range wantStructs {
				if (w.name == "percpu_counter" || w.name == "pcpu_hot") && c.rssStatCount == 0 {
					continue // 6.2+
				}
				s, ok := p.Structs[w.name]
				require.True(t, ok, "struct %s", w.name)
				for _, f := range w.required {
					require.Contains(t, s.Fields, f, "%s.%s", w.name, f)
				}
			}
			ts := p.Structs["task_struct"]
			require.Less(t, len(ts.Fields), maxFields, "task_struct's fields cut off")
			require.Contains(t, ts.Fields, "thread_info.cpu")
			if c.tasks != 0 {
				require.Equal(t, c.tasks, ts.Fields["tasks"].Offset)
				require.Equal(t, c.threadNode, ts.Fields["thread_node"].Offset)
				require.Equal(t, c.comm, ts.Fields["comm"].Offset)
			}
			require.Equal(t, c.rssStatCount, p.Structs["mm_struct"].Fields["rss_stat"].Count)
			require.Equal(t, uint64(16), p.Structs["upid"].Size)
			// What a core is written with: pt_regs is user_regs_struct's
			// first 21 words, the thread's TLS bases are in thread_struct.
			require.Equal(t, uint64(168), p.Structs["pt_regs"].Size)
			require.Contains(t, ts.Fields, "thread.fsbase")
			require.Contains(t, ts.Fields, "thread.gsbase")
			require.Contains(t, p.Structs["mm_struct"].Fields, "saved_auxv")
			require.Contains(t, p.Structs["mm_struct"].Fields, "context.vdso_image")
			require.Contains(t, p.Structs["dentry"].Fields, "d_name.name")
			require.Contains(t, p.Structs["mount"].Fields, "mnt.mnt_root")
		})
	}
}
