"""sgl-kvext benchmarks (installed as package ``sgl_kvext_bench``; command ``sgl-kvext-bench``).

Every benchmark measures the thing and its raw limit side by side in one run and writes JSON;
docs/benchmarks.md records the numbers with the command that produced them.
"""
