"""The OS: the emulated kernel that dies and the structures a backup adopts.

The kernel daemon (kernel), its file system (vfs, fs, journal, namei, dir, bmap, balloc,
bufcache, buffers, icache, reserve, writeback, disklayout), its page cache (pagecache) and
FUSE server (fuse), processes (proc, rtaware), fault injection (faults), and the readers of
its own objects in physical memory that a recovering kernel uses (memreader, pageadopt).
Uses the hardware (kernel/hw), never the offline tools.
"""
