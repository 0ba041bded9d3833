"""The emulated hardware and hypervisor: what outlives a kernel.

Physical memory (physmem), disks (blockdev), the NIC (net), partitions and their CPUs
(machine, procset), the warm-cache VMM (vmm), the heartbeat mailbox and doorbells (mailbox),
the management channel (control), the FUSE connection seen from outside (fusedev) and the
host that starts and stops kernels (host). Imports nothing of the OS above it.
"""
