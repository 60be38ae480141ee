// Package profiles describes one Linux kernel build to the code that reads
// its memory-management structures: where its symbols are, how its structs
// are laid out, and constants derived from its types. A [Profile] is built
// once per kernel build and matched to a guest by its linux_banner.
//
// # Sources
//
// A profile is built from one of:
//
//   - a kernel file ([BuildFromImage]): an x86 bzImage (Documentation/x86/
//     boot.rst; payload compressed with gzip, bzip2, lzma, xz, lz4 or
//     zstd) or an ELF vmlinux. Distribution kernels strip vmlinux symbols,
//     so symbols come from the kernel's own kallsyms tables
//     (scripts/kallsyms.c; see [DecodeKallsyms]) and types from its BTF
//     (CONFIG_DEBUG_INFO_BTF, read with github.com/cilium/ebpf/btf). An
//     ELF symbol table or a System.map, when there is one, is
//     cross-checked against kallsyms.
//   - a running kernel's image in guest memory ([BuildFromKernelMemory]),
//     by the same code, optionally with the kernel's vmcoreinfo text.
//   - a Volatility 3 ISF file ([FromISF]), for kernels without BTF.
//
// Nothing is taken from per-version tables: offsets, sizes and array
// lengths are read from the kernel's types. The few values that are C
// macros and so in no type information are defaults, listed in
// [Profile.Defaults].
//
// # Addresses
//
// Symbol addresses are unrelocated (link-time) x86_64 kernel addresses.
// For a KASLR guest, add the guest's offset (relocated _text minus
// Symbols["_text"]). Per-CPU symbols are not recorded.
//
// # Structs
//
// Structs maps C struct names (page, pglist_data, zone, free_area,
// list_head, per_cpu_pages, spinlock, atomic_t, atomic_long_t, static_key,
// cpumask) to their size and fields. Members of anonymous structs and
// unions are flattened to their absolute offsets under their own names
// (page.lru, page.compound_head); members of named struct members appear
// as dotted paths (zone "lock.rlock.raw_lock", the spinlock's lock word).
// Bitfields are left out. For arrays, Field.Size is the whole array and
// Field.Count the element count.
//
// # Constants
//
//	MAX_ORDER                  len(zone.free_area): number of page orders
//	MIGRATE_TYPES              len(free_area.free_list)
//	NR_PCP_LISTS               len(per_cpu_pages.lists)
//	MIGRATE_PCPTYPES           enum migratetype
//	MIGRATE_MOVABLE            enum migratetype
//	NR_FREE_PAGES              enum zone_stat_item: index into zone.vm_stat
//	MAX_NR_ZONES               enum zone_type __MAX_NR_ZONES
//	N_POSSIBLE, N_ONLINE, N_MEMORY, NR_NODE_STATES   enum node_states
//	MAX_NUMNODES               vmcoreinfo LENGTH(node_data), an ISF's
//	                           node_data array type, or the bit size of
//	                           nodemask_t in BTF
//	PAGE_SIZE                  vmcoreinfo PAGESIZE, else 4096 (x86_64)
//	PAGE_BUDDY_MAPCOUNT_VALUE  vmcoreinfo; default -129 (~PG_buddy in 6.1)
//	PAGE_ALLOC_COSTLY_ORDER    default 3 (a macro since 2.6.23)
//	PAGEBLOCK_ORDER            default 9 (x86_64 HPAGE_PMD_ORDER)
//	NR_LOWORDER_PCP_LISTS      MIGRATE_PCPTYPES * (PAGE_ALLOC_COSTLY_ORDER + 1)
//	NR_PCP_THP                 NR_PCP_LISTS - NR_LOWORDER_PCP_LISTS
//	KALLSYMS_NUM_SYMS          symbols decoded from kallsyms
//
// and, when vmcoreinfo states them, PAGE_OFFLINE_MAPCOUNT_VALUE,
// PAGE_HUGETLB_MAPCOUNT_VALUE, PG_* flag bits and KERNEL_IMAGE_SIZE.
//
// Per-CPU free lists: mm/page_alloc.c order_to_pindex() puts pages of
// order o <= PAGE_ALLOC_COSTLY_ORDER and migrate type m on list
// MIGRATE_PCPTYPES*o + m, and THP pages (order pageblock_order) on the
// NR_PCP_THP lists after them: one list in 6.1 (Debian's 6.1.170 has the
// later two-list layout, which its BTF shows as 14 lists), none without
// CONFIG_TRANSPARENT_HUGEPAGE. [Profile.PCPListOrder] applies this.
// Building fails if the list count fits no such layout.
//
// # JSON format
//
// [Profile.Encode] writes, and [Decode] reads, one JSON object:
//
//	{
//	  "version": 1,
//	  "name": "6.1.0-47-amd64-322f4442",
//	  "banner": "Linux version 6.1.0-47-amd64 (debian-kernel@...) ...",
//	  "release": "6.1.0-47-amd64",
//	  "build_id": "12f1e1ca032e499318c5cc64e024d3e617624bf6",
//	  "source": "image",
//	  "symbols": {"_text": 18446744071578845184, "node_data": ...},
//	  "structs": {"page": {"size": 64, "fields": {
//	      "lru": {"offset": 8, "size": 16},
//	      ...}}, ...},
//	  "constants": {"MAX_ORDER": 11, ...},
//	  "defaults": ["PAGEBLOCK_ORDER", ...]
//	}
//
// Numbers are JSON integers (addresses as unsigned 64-bit decimal). The
// name is the release and the first 8 hex digits of the SHA-256 of the
// banner (without its trailing newline). Readers refuse a "version"
// greater than [FormatVersion]; writers bump it when a change would make
// older readers misread a profile. Unknown members are ignored.
//
// # Trust model
//
// Everything this package reads is untrusted: kernel files, guest memory
// (a guest controls its own memory), vmcoreinfo (written by the guest
// kernel), ISF and profile files. Parsers check every count, offset and
// size before use, never allocate a size read from input without a bound
// (decompressed payload 1 GiB, flat image 1 GiB, BTF 64 MiB, profile JSON
// 16 MiB, ISF 256 MiB, vmcoreinfo 1 MiB), bound every walk, and return
// errors instead of panicking. A profile that decodes is self-consistent
// ([Profile.Validate]), but a profile is only as trustworthy as its
// source: a profile built from a guest's memory describes whatever that
// guest chose to show. Code that walks guest memory with a profile must
// still bound its walks. Profile names are restricted to
// [A-Za-z0-9._+-] so that a [Store] cannot be made to write outside its
// directory.
package profiles
