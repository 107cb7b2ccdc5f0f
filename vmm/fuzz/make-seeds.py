#!/usr/bin/env python3
"""Writes the seed corpus of zapvm's fuzz targets: vmm/fuzz/corpus/<target>/<seed>.

A few valid and a few invalid inputs per target, laid out in the byte formats the targets
decode (tests/parsers/support/mod.rs: `check_api_line`, `BalloonRig::run_fuzz`, `MemRig::run_fuzz`,
`run_virtqueue_fuzz`). They give libFuzzer a start inside each format; .ci/run fuzzes every
target from them. The files are checked in; run this again (from anywhere) after a format
changes:  python3 vmm/fuzz/make-seeds.py
"""

import os
import shutil
import struct

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def u8(v):
    return struct.pack("<B", v & 0xFF)


def u16(v):
    return struct.pack("<H", v & 0xFFFF)


def u32(v):
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v):
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


# --- fuzz_api_line: one QMP request of the control socket ----------------------------------------------

API_LINES = {
    "negotiate": b'{"execute":"qmp_capabilities"}',
    "balloon": b'{"execute":"balloon","arguments":{"value":536870912},"id":1}\n',
    "qom-set": b'{"execute":"qom-set","arguments":{"path":"vmem0","property":"requested-size","value":4194304}}',
    "query-stats": b'{"execute":"query-stats","arguments":{"target":"vcpu","providers":[{"provider":"kvm","names":["exits"]}]}}',
    "id-object": b'{"execute":"stop","id":{"a":[1,2.5,null]},"control":{}}',
    "duplicate": b'{"execute":"quit","execute":"stop"}',
    "oob": b'{"exec-oob":"quit"}',
    "negative": b'{"execute":"balloon","arguments":{"value":-1}}',
    "not-json": b"hello\n",
    "not-an-object": b'["execute","quit"]',
    "unknown-command": b'{"execute":"system_reset","id":2}',
    "unknown-argument": b'{"execute":"stop","arguments":{"now":true}}',
    "not-utf8": b'{"execute":"\xff\xfe"}',
}

# --- fuzz_balloon_queue: header, then operations ----------------------------------------------
# Header: features byte (bit 0 MUST_TELL_HOST, 1 STATS_VQ, 2 PAGE_REPORTING, 3 DEFLATE_ON_OOM),
# two queue-size bytes (1 << (b % 9)). Each operation: queue byte, opcode byte (% 8), operands.

B_DATA_OFFSET_MODE = 0  # fuzz_addr mode 0..3: B_DATA + v % B_DATA_LEN
B_LEN_WORDS_MODE = 0  # fuzz_len mode 0..2: (v % 64) * 4


def b_desc(q, i, data_offset, len_words, flags=0, nxt=0):
    """Descriptor i of queue q pointing into the scratch area, len_words u32s long."""
    return (
        u8(q) + u8(0) + u16(i)
        + u32(data_offset) + u8(B_DATA_OFFSET_MODE)
        + u16(len_words) + u8(B_LEN_WORDS_MODE)
        + u8(flags) + u16(nxt)
    )


def b_desc_raw_addr(q, i, addr, length, flags=0, nxt=0):
    """Descriptor with an arbitrary 64-bit address (fuzz_addr mode 7) and length (mode 7)."""
    return u8(q) + u8(0) + u16(i) + u32(0) + u8(7) + u64(addr) + u16(0) + u8(7) + u32(length) + u8(flags) + u16(nxt)


def b_push(q, head):
    return u8(q) + u8(2) + u16(head) + u8(1)  # 1 % 8 != 0: head % queue size


def b_pfns(q, data_offset, pfns_start, n, mode=0, run=True):
    """A PFN array at the scratch offset: n PFNs from pfns_start, consecutive (run) or not."""
    out = u8(q) + u8(4) + u16(data_offset) + u8(n) + u32(pfns_start) + u8(mode)
    for k in range(n):
        out += u8(1) if run else (u8(0) + u32(pfns_start + 7 * (k + 1)))
    return out


def b_notify(q, index=None):
    if index is None:
        return u8(q) + u8(6) + u8(1)
    return u8(q) + u8(6) + u8(0) + u32(index)


def b_raw(q, data_offset, payload):
    return u8(q) + u8(3) + u16(data_offset) + u8(len(payload)) + payload


def b_avail_idx(q, idx):
    return u8(q) + u8(7) + u16(idx)


def balloon_header(features, size_a=4, size_b=4):
    return u8(features) + u8(size_a) + u8(size_b)  # sizes 1 << 4 = 16


INFLATE, DEFLATE = 0, 1
BALLOON = {
    # Inflate 16 consecutive PFNs (one run, one discard), then deflate them.
    "inflate-run-then-deflate": balloon_header(0b0001)
    + b_pfns(INFLATE, 0, 0x100, 16) + b_desc(INFLATE, 0, 0, 16) + b_push(INFLATE, 0) + b_notify(INFLATE)
    + b_pfns(DEFLATE, 0x100, 0x100, 16) + b_desc(DEFLATE, 0, 0x100, 16) + b_push(DEFLATE, 0) + b_notify(DEFLATE),
    # Scattered PFNs: several discards.
    "inflate-scattered": balloon_header(0b0000)
    + b_pfns(INFLATE, 0x40, 0x200, 8, run=False) + b_desc(INFLATE, 3, 0x40, 8) + b_push(INFLATE, 3) + b_notify(INFLATE),
    # Stats queue with a stats buffer (tag u16, value u64) and page reporting of a free range.
    "stats-and-report": balloon_header(0b0110)
    + b_raw(2, 0x200, u16(4) + u64(1 << 20) + u16(5) + u64(8 << 20)) + b_desc(2, 0, 0x200, 5) + b_push(2, 0) + b_notify(2)
    + b_desc_raw_addr(3, 0, 0x300000, 0x1000, flags=2) + b_push(3, 0) + b_notify(3),
    # Chained descriptors (NEXT) over two PFN arrays.
    "inflate-chain": balloon_header(0b1001, 3, 3)
    + b_pfns(INFLATE, 0x400, 0x10, 4) + b_pfns(INFLATE, 0x500, 0x20, 4)
    + b_desc(INFLATE, 0, 0x400, 4, flags=1, nxt=1) + b_desc(INFLATE, 1, 0x500, 4) + b_push(INFLATE, 0) + b_notify(INFLATE),
    # Invalid: PFNs beyond RAM and in the hot-pluggable region.
    "pfns-outside-ram": balloon_header(0b0001)
    + b_pfns(INFLATE, 0, 0x1000, 16, mode=1) + b_pfns(INFLATE, 0x80, 0x1000, 4, mode=3)
    + b_desc(INFLATE, 0, 0, 20) + b_push(INFLATE, 0) + b_notify(INFLATE),
    # Invalid: a descriptor loop (0 -> 1 -> 0).
    "descriptor-loop": balloon_header(0b0000)
    + b_desc(INFLATE, 0, 0, 4, flags=1, nxt=1) + b_desc(INFLATE, 1, 0, 4, flags=1, nxt=0) + b_push(INFLATE, 0) + b_notify(INFLATE),
    # Invalid: a buffer far outside guest RAM, an odd length, a hostile avail index.
    "wild-buffer-and-avail-index": balloon_header(0b0000)
    + b_desc_raw_addr(INFLATE, 0, 0xFFFF_FFFF_FFFF_F000, 0x7FFF_FFFF) + b_push(INFLATE, 0) + b_avail_idx(INFLATE, 0x8000)
    + b_notify(INFLATE) + b_notify(INFLATE, 9),
    # Invalid: the driver's own rings as the PFN array (inflating the ring pages).
    "inflate-own-ring": balloon_header(0b0000)
    + b_desc_raw_addr(INFLATE, 0, 0x10000, 64) + b_push(INFLATE, 0) + b_notify(INFLATE),
}

# --- fuzz_virtio_mem_queue: header, then operations -------------------------------------------
# Header: requested size (b % 17 blocks of 2 MiB), queue size (1 << (b % 8)). Operations: an
# opcode byte (% 8) and its operands. Requests are 24 bytes (type u16, pad, addr u64, nb u16).

M_PLUG, M_UNPLUG, M_UNPLUG_ALL, M_STATE = 0, 1, 2, 3


def m_request(data_offset, kind, block, nb):
    """A request at the scratch offset: kind, the region's block `block` (addr mode 0), nb blocks."""
    return u8(3) + u16(data_offset) + u8(kind) + u16(block) + u8(0) + u8(0) + u8(nb)  # nb mode 0: b % 18


def m_request_page(data_offset, kind, page, nb):
    """A request at the region's start plus `page` 4 KiB pages (addr mode 5), nb blocks."""
    return u8(3) + u16(data_offset) + u8(kind) + u16(page) + u8(5) + u8(0) + u8(nb)


def m_request_raw(data_offset, kind16, addr, nb16):
    """A request with any type (kind mode 7), any address (addr mode 7) and any count (nb mode 3)."""
    return u8(3) + u16(data_offset) + u8(7) + u16(kind16) + u16(0) + u8(7) + u64(addr) + u8(3) + u16(nb16)


def m_desc(i, data_offset, len_mode, flags=0, nxt=0):
    """Descriptor i into the scratch area; len_mode 0: 24 (request), 1: 10 (response), 2: 16."""
    return u8(0) + u16(i) + u32(data_offset) + u8(0) + u8(len_mode) + u8(flags) + u16(nxt)


def m_push(head):
    return u8(2) + u16(head) + u8(1)


def m_notify():
    return u8(6) + u8(1)


def m_requested(blocks):
    return u8(7) + u8(blocks)


def mem_header(requested_blocks, size_shift=3):
    return u8(requested_blocks) + u8(size_shift)


def m_exchange(req_offset, resp_offset, head):
    """A request descriptor chained to a write-only response descriptor, pushed and notified."""
    return (
        m_desc(head, req_offset, 0, flags=1, nxt=head + 1) + m_desc(head + 1, resp_offset, 1, flags=2)
        + m_push(head) + m_notify()
    )


VIRTIO_MEM = {
    "plug-then-unplug": mem_header(4)
    + m_request(0x0, M_PLUG, 0, 2) + m_exchange(0x0, 0x100, 0)
    + m_request(0x200, M_UNPLUG, 0, 1) + m_exchange(0x200, 0x300, 2),
    "plug-unplug-all-state": mem_header(8)
    + m_request(0x0, M_PLUG, 2, 4) + m_exchange(0x0, 0x100, 0)
    + m_request(0x200, M_STATE, 0, 8) + m_exchange(0x200, 0x300, 2)
    + m_request(0x400, M_UNPLUG_ALL, 0, 0) + m_exchange(0x400, 0x500, 4),
    "requested-size-changes": mem_header(2)
    + m_requested(16) + m_request(0x0, M_PLUG, 0, 16) + m_exchange(0x0, 0x100, 0) + m_requested(0),
    # Invalid: beyond the region, not block-aligned, an unknown type, a huge count.
    "request-outside-region": mem_header(16)
    + m_request_raw(0x0, M_PLUG, 0x1_0000_0000, 1) + m_exchange(0x0, 0x100, 0),
    "request-unaligned": mem_header(16)
    + m_request_page(0x0, M_UNPLUG, 1, 2) + m_exchange(0x0, 0x100, 0),
    "request-unknown-type": mem_header(16)
    + m_request_raw(0x0, 0x7777, 0, 1) + m_exchange(0x0, 0x100, 0),
    "request-huge-count": mem_header(16)
    + m_request_raw(0x0, M_PLUG, 0, 0xFFFF) + m_exchange(0x0, 0x100, 0),
    # Invalid: a short request buffer and no response descriptor.
    "short-request-no-response": mem_header(4)
    + m_request(0x0, M_PLUG, 0, 1) + m_desc(0, 0x0, 2) + m_push(0) + m_notify(),
}

# --- fuzz_virtqueue_chain: size byte, ring offsets, memory contents ---------------------------
# size: 0..15 as is, else 1 << (b % 10); then desc, avail, used offsets (u16 each, aligned by the
# target); the rest is written from `desc` and XORed from `avail` (so rings overlap the table).


def vq_desc(addr, length, flags, nxt):
    return u64(addr) + u32(length) + u16(flags) + u16(nxt)


def vq(size_byte, desc, avail, used, rest):
    return u8(size_byte) + u16(desc) + u16(avail) + u16(used) + rest


# The avail ring's first bytes are the rest's first bytes too, i.e. descriptor 0's address: an
# address of 0x1_0000 reads as avail flags 0, idx 1, ring[0] = head 0, so one chain is available.
ONE_AVAILABLE = 0x1_0000

VIRTQUEUE = {
    "two-descriptor-chain": vq(4, 0x0, 0x1000, 0x2000, vq_desc(ONE_AVAILABLE, 0x100, 1, 1) + vq_desc(0x3100, 0x80, 2, 0)),
    "single-descriptor": vq(1, 0x100, 0x400, 0x800, vq_desc(ONE_AVAILABLE, 16, 0, 0)),
    "size-64": vq(0x88, 0x0, 0x2000, 0x4000, vq_desc(ONE_AVAILABLE, 0x1000, 0, 0) * 4),
    # Invalid: a descriptor loop, an overflowing buffer, size 0, rings outside memory.
    "descriptor-loop": vq(4, 0x0, 0x1000, 0x2000, vq_desc(ONE_AVAILABLE, 8, 1, 1) + vq_desc(0x3000, 8, 1, 0)),
    "overflowing-buffer": vq(2, 0x0, 0x1000, 0x2000, vq_desc(0xFFFF_FFFF_FFFF_FF00, 0x1000, 0, 0)),
    "size-zero": vq(0, 0x0, 0x0, 0x0, b""),
    "rings-at-the-end": vq(0x89, 0xFFF0, 0xFFFE, 0xFFFC, b"\xff" * 64),
    "indirect-flag": vq(4, 0x0, 0x1000, 0x2000, vq_desc(0x3000, 0x40, 4, 0)),
}

TARGETS = {
    "fuzz_api_line": API_LINES,
    "fuzz_balloon_queue": BALLOON,
    "fuzz_virtio_mem_queue": VIRTIO_MEM,
    "fuzz_virtqueue_chain": VIRTQUEUE,
}


def main():
    for target, seeds in TARGETS.items():
        directory = os.path.join(CORPUS, target)
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        for name, data in seeds.items():
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
        print(f"{target}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
