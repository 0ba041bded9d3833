"""Completing a dead kernel's running journal transaction on its disk.

Promises to a kernel that adopts a dead kernel's cache (kernel/core/cachewalk.py gives the
transaction's metadata blocks): ``complete_transaction(dev, blocks)`` commits them as the
dead kernel would have at its next commit, before the file system is mounted, only if fsck
would accept the result (kernel/tools/txncheck.py); an inode that explains a problem is put
back as on the disk and the rest committed if it then passes; otherwise nothing is, and
``Completion`` says what was refused and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kernel.tools.txncheck import check_transaction


@dataclass
class Completion:
    """What became of the dead kernel's running transaction."""

    committed: int = 0  # metadata blocks committed
    refused: list[str] = field(default_factory=list)  # what fsck would have rejected
    reverted: list[int] = field(default_factory=list)  # inodes put back as on the disk
    rejected_blocks: int = 0  # blocks not committed as adopted


def complete_transaction(dev, blocks: dict[int, bytes]) -> Completion:
    """Commit the dead kernel's running transaction on its disk, as the dead kernel would
    have at its next commit, before the file system is mounted: replay what the log holds,
    check the adopted metadata blocks against the disk (kernel/tools/txncheck.py), commit them as
    one more transaction if fsck would accept the result, write it home. When what fsck
    would reject comes from changed inodes only, those inodes are put back as the disk
    has them and the rest is committed if it then passes; otherwise nothing is."""
    from kernel.core.disklayout import SB_BLOCK, Superblock
    from kernel.core.journal import Journal

    if not blocks:
        return Completion()
    sb = Superblock.unpack(dev.read(SB_BLOCK), dev.path)
    js, jl = sb.journal_start, sb.journal_len
    j = Journal(
        dev, js, jl, sb.csum_seed, home_ok=lambda b: 0 < b < sb.nblocks and not js <= b < js + jl
    )
    j.replay()
    outside = [b for b in blocks if not (0 < b < sb.nblocks) or js <= b < js + jl]
    if outside:
        return Completion(
            refused=[f"block {outside[0]} of the running transaction is outside the file system"],
            rejected_blocks=len(blocks),
        )
    blocks = dict(blocks)
    problems = check_transaction(dev.read, dev.nblocks, blocks)
    done = Completion(refused=[str(p) for p in problems])
    if problems and all(p.ino for p in problems):
        done.reverted = sorted({p.ino for p in problems})
        done.rejected_blocks = _revert_inodes(dev, sb, blocks, done.reverted)
        if check_transaction(dev.read, dev.nblocks, blocks):
            done.rejected_blocks, done.reverted = len(blocks), []
            return done
    elif problems:
        done.rejected_blocks = len(blocks)
        return done
    j.commit(blocks)
    j.checkpoint()
    done.committed = len(blocks)
    return done


def _revert_inodes(dev, sb, blocks: dict[int, bytes], inos: list[int]) -> int:
    """Put inodes back in the transaction's inode-table blocks as the disk has them; the
    number of blocks changed."""
    from kernel.core.disklayout import INODES_PER_BLOCK
    from kernel.param import INODE_SIZE as size

    touched = set()
    for ino in inos:
        b, off = sb.inode_start + ino // INODES_PER_BLOCK, (ino % INODES_PER_BLOCK) * size
        if b in blocks:
            buf = bytearray(blocks[b])
            buf[off : off + size] = dev.read(b)[off : off + size]
            blocks[b] = bytes(buf)
            touched.add(b)
    return len(touched)
