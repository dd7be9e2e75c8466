"""Where and how a run executes: its directory on disk, atomic writes, devices, processes, memory, caches."""
