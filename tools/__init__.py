"""Everything that is not shipped in a model repository: tiny-model builders, export, benchmarks."""
