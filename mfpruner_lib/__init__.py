"""Library code for the demo, the tests and the command-line scripts; not shipped in model repos.

    tiny_models   tiny random-weight MFPruner / stock checkpoints of every family, built locally
    families      one entry per model family: its classes, tiny builder, export row, geometry
    flops         FLOPs of a prefill from a config (FastV's figure and the whole prefill)
    model_sizes   configs of the real models from their published sizes (no weights)
    bench_utils   interleaved timing, peak memory, machine load, generated docs sections
    browser       driving the demo in a real browser (Debian's chromium through Playwright)
    cli           the rule of every command-line tool: a refused input is one line `error: ...`, exit 2

Command-line scripts live in `tools/` (`python -m tools.<name>`); they import from here.
"""
