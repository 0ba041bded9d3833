"""Offline tools: they work on a stopped or dead machine's disk and memory.

mkfs and format_disks (mkfs), the file-system checker (fsck), and the check of a dead
kernel's running transaction against fsck's rules before a backup commits it (txncheck).
They may use the OS's on-disk layout and the hardware; the OS never uses them.
"""
