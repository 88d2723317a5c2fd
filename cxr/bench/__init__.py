"""The benchmark, `python -m cxr.bench SUITE`: one module per suite, each writing its own JSON.

    loader.py   the naive torchvision loader vs building and reading the decode-once cache
    train.py    a bare training loop vs the real trainer, on the same network and batches
    sweep.py    one frozen-backbone pass vs the head variants run as the real frozen-backbone sweep
    gpu.py      the GPU check (its plan and time budget: gpu_plan.py)
    cache.py    the decode cache's build: speed and peak memory as the image count grows
    index.py    indexing large tables (NIH layout, generic CSV), no decoding
    timing.py   how every suite measures and records (timings, busy GPU time, peak RSS, the JSON)
    images.py   the images they read: generated in parallel, or real ones repeated through links
    runs.py     how they build runs: the trainer's own config checks, builder and epoch; real sweeps
    options.py  each suite's options, its scale (FULL and --quick), its scratch folder

docs/benchmark.md lists the subcommands, their options and JSON keys; docs/gpu-check.md the GPU check.
"""
