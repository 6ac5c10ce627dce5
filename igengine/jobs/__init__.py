"""Jobs: what the CLI calls. Each resolves a request into configs, builds the pipeline and runs it.

  sample  `igengine sample` (settings resolution, backend, sampler, decoder, writers)
  bulk    chunked, resumable, torchrun-sharded execution of a sample job
  launch  where this process sits in a torchrun launch
  export  `igengine export`
  preview grid.png after packing, the png/ folder layout
  advice  one-line warnings for choices that run but make no sense on this machine

May import every layer below it (models, backends, export, sampling, vae, store); imported by
igengine.cli, igengine.api (the Python API) and the tools above it (bench, digits).
"""
