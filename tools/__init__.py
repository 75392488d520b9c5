"""Command-line scripts (`python -m tools.<name>`, each with a main()): export, benchmarks, FLOPs table,
GPU check, lmms-eval tables, tiny models, screenshots, the demo's Space folder. Not shipped in model repos; the code they
share with the demo and the tests lives in `mfpruner_lib/`."""
