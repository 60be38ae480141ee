// Package introspect reads a paused x86-64 Linux guest's kernel from its
// RAM, from outside: guest-physical memory ([PhysMem], over the host
// mappings of the guest's RAM files), address translation ([Translator]:
// 4- and 5-level paging, 2 MiB and 1 GiB pages, Intel SDM Vol. 3A ch. 4),
// the KASLR slide and randomized bases ([OpenKernel]) and, its purpose, the
// guest kernel's free pages ([Kernel.WalkFree]).
//
// The walk follows the kernel's own page allocator (mm/page_alloc.c,
// include/linux/mmzone.h): node_data[] to each node's pglist_data, its
// zones, each zone's free_area[order].free_list[migratetype] lists of
// struct pages (the buddy allocator), and each possible CPU's per_cpu_pages
// lists (at zone->per_cpu_pageset plus __per_cpu_offset[cpu]). Struct
// layouts and symbols come from a profile (package profiles); nothing is
// assumed about a kernel version.
//
// # Trust
//
// Guest memory is untrusted: a guest can hold anything, and a guest paused
// at a random instruction can be in the middle of changing a list. Every
// pointer is checked before it is followed (inside guest RAM, inside the
// struct page array and the zone, aligned); every list walk is bounded by
// the zone's size and catches cycles and blocks linked twice; the whole
// walk has a time bound. A frame is called free only with proof: it heads a
// block on a list whose back links are consistent, in a zone whose lock was
// free when the guest paused, with the PageBuddy type and its order on a
// buddy list, and the zone's nr_free and NR_FREE_PAGES counters agree with
// what was found. A zone that fails any check is reported untrusted and all
// its pages count as used; a per-CPU list set that fails costs only its own
// pages. Errors are returned, never panics.
package introspect
