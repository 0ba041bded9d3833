"""The emulated platform, in layers (docs/ARCHITECTURE.md, "Layers"): ``hw`` (hardware and
hypervisor), ``core`` (the OS), ``tools`` (offline tools), ``apps`` (programs on a partition);
tunables in ``param``."""
