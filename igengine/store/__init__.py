"""Storage: how outputs reach the disk without ever being half-written, and how runs are recorded.

  atomic     atomic writes (temporary name, fsync, rename) and PNG encoding
  manifest   manifest.json, and the rules that protect another run's output folder
  locks      the per-rank lock on an output folder
  npzstream  .npz / .npy written and read member by member (constant memory)
  chunks     the chunk files of a bulk run (the unit of output and resume)
  pack       chunks -> samples.npz (+ latents), streamed in index order
  clean      removing a packed run's chunks once samples.npz reads back equal to them, and rebuilding them
  preview    grid.png of the first samples, and the png/ folder layout (1,000 files per subfolder)

May import: igengine.errors (and numpy). Knows nothing about models, samplers or backends.
"""
