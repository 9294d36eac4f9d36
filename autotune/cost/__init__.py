"""The cost model: a model and a recipe in, parameter counts, memory, host needs and throughput out."""
