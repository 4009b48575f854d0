"""The trivial function of the benchmarks' function steps, in a module of its own.

A function step's script repeats the module-level imports of the module that defines
its function (`controller.pipeline.function_step`). Defined next to the benchmark
code, a trivial step imported the benchmark's harness too (psutil and
`tests.helpers_server`, ~0.35 s of CPU per step), which no user's trivial step pays;
this module imports nothing.
"""


def noop(value: int = 0):
    return value + 1
