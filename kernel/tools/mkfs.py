"""mkfs: write an empty crashbench file system into a (sparse) disk image.

Promises to the testbed (harness/testbed.py), the CLI and tests: ``format_disks(machine,
workdir)`` gives every disk of a machine its image (kept when it exists, made owner-only).
``mkfs(path, size_bytes)`` creates or overwrites `path` as a sparse file of size_bytes
(rounded down to whole blocks), readable and writable by its owner only
(param.OWNER_ONLY_MODE, whatever the umask or the old file's mode: the image holds every
file's content), holding the layout drawn in kernel/core/fs.py: superblock, an empty journal, an
inode table of INODES_PER_MIB inodes per MiB (or `inodes`), the block bitmap and a root
directory (inode 1, mode 0o40755, uid/gid 0). Only the blocks with content are written. An
image owned by a running kernel (flock held) is refused with DeviceError; a size or journal
that cannot hold the layout (or a journal shorter than MIN_JOURNAL_BLOCKS) is refused with
ValueError naming the figure, before the image is touched. The journal takes at most a
quarter of the disk: a larger journal_blocks is reduced to that.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import stat
import time
from pathlib import Path

import numpy as np
import xxhash

from kernel import param
from kernel.core.dir import first_dir_block
from kernel.core.disklayout import (
    BITS_PER_BLOCK,
    INODES_PER_BLOCK,
    NADDR,
    ROOT_INO,
    SB_BLOCK,
    Inode,
    Superblock,
    pack_inode,
)
from kernel.core.journal import format_journal
from kernel.hw.blockdev import BlockDevice, DeviceError

BSIZE = param.BLOCK_SIZE
MIN_JOURNAL_BLOCKS = 256  # tunable candidate: smallest journal mkfs accepts (1 MiB)
MIN_INODES = 64
MIN_DATA_BLOCKS = 16


def format_disks(machine, workdir: str | Path, force: bool = False) -> None:
    """Every disk of ``machine`` as an image in ``workdir``: formatted when it has none (or
    when ``force``); an existing image is kept, made owner-only (formatted when images were
    0644)."""
    for d in machine.disks:
        img = Path(workdir) / d.image
        if force or not img.exists():
            mkfs(str(img), d.size)
        else:
            os.chmod(img, param.OWNER_ONLY_MODE)


def mkfs(
    path: str,
    size_bytes: int,
    *,
    journal_blocks: int = param.JOURNAL_BLOCKS,
    inodes: int | None = None,
) -> None:
    path = str(path)
    nblocks = int(size_bytes) // BSIZE
    if journal_blocks < MIN_JOURNAL_BLOCKS:
        raise ValueError(
            f"mkfs: a journal of {journal_blocks} blocks is too short; at least "
            f"{MIN_JOURNAL_BLOCKS} are needed"
        )
    journal_blocks = min(int(journal_blocks), nblocks // 4)
    if journal_blocks < MIN_JOURNAL_BLOCKS:
        raise ValueError(
            f"mkfs: size {size_bytes} bytes leaves a journal of {journal_blocks} "
            f"blocks; at least {MIN_JOURNAL_BLOCKS} are needed (size >= "
            f"{4 * MIN_JOURNAL_BLOCKS * BSIZE} bytes)"
        )
    ninodes = (
        int(inodes) if inodes else max(MIN_INODES, (int(size_bytes) >> 20) * param.INODES_PER_MIB)
    )
    ninodes = math.ceil((ninodes + 1) / INODES_PER_BLOCK) * INODES_PER_BLOCK  # + inode 0
    js = SB_BLOCK + 1
    its = js + journal_blocks
    itl = ninodes // INODES_PER_BLOCK
    bms = its + itl
    bml = math.ceil(nblocks / BITS_PER_BLOCK)
    ds = bms + bml
    if nblocks < ds + MIN_DATA_BLOCKS:
        raise ValueError(
            f"mkfs: size {size_bytes} bytes is too small for {ninodes} inodes and a "
            f"journal of {journal_blocks} blocks (need at least "
            f"{(ds + MIN_DATA_BLOCKS) * BSIZE} bytes)"
        )
    if nblocks >= param.MAX_DISK_BLOCKS:
        raise ValueError(f"mkfs: size {size_bytes} bytes exceeds {param.MAX_DISK_BLOCKS} blocks")

    fd = os.open(path, os.O_RDWR | os.O_CREAT, param.OWNER_ONLY_MODE)
    try:
        os.fchmod(fd, param.OWNER_ONLY_MODE)  # an existing image keeps its mode through O_CREAT
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeviceError(
                errno.EBUSY, f"{path}: owned by another kernel (exclusive lock held)"
            ) from None
        os.ftruncate(fd, 0)  # every old block reads as zeros again
        os.ftruncate(fd, nblocks * BSIZE)
    finally:
        os.close(fd)

    uuid = os.urandom(16)
    now = time.time_ns()
    sb = Superblock(
        nblocks=nblocks,
        ninodes=ninodes,
        journal_start=js,
        journal_len=journal_blocks,
        inode_start=its,
        inode_len=itl,
        bitmap_start=bms,
        bitmap_len=bml,
        data_start=ds,
        csum_seed=xxhash.xxh32_intdigest(uuid),
        uuid=uuid,
        mkfs_time_ns=now,
    )
    root_blk = ds
    root = Inode(
        ROOT_INO,
        stat.S_IFDIR | 0o755,
        0,
        0,
        2,
        BSIZE,
        now,
        now,
        now,
        1,
        0,
        [root_blk] + [0] * (NADDR - 1),
    )
    with BlockDevice(path, "none", delay=False) as dev:
        dev.write(SB_BLOCK, sb.pack().ljust(BSIZE, b"\0"))
        format_journal(dev, js, journal_blocks, sb.csum_seed)
        itab = bytearray(BSIZE)
        off = (ROOT_INO % INODES_PER_BLOCK) * param.INODE_SIZE
        itab[off : off + param.INODE_SIZE] = pack_inode(root, sb.csum_seed)
        dev.write(its + ROOT_INO // INODES_PER_BLOCK, itab)
        bits = np.zeros(bml * BITS_PER_BLOCK, dtype=np.uint8)
        bits[: root_blk + 1] = 1  # everything before the data area, and the root dir
        bits[nblocks:] = 1  # past the end of the device: never free
        packed = np.packbits(bits, bitorder="little")
        for k in range(bml):
            chunk = packed[k * BSIZE : (k + 1) * BSIZE]
            if chunk.any():
                dev.write(bms + k, chunk.tobytes())
        dev.write(root_blk, first_dir_block(ROOT_INO, ROOT_INO))
        dev.flush()
