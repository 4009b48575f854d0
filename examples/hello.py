"""A tiny step for the README's walk-through: says hello, naps, says goodbye."""

import sys
import time

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
print(f"hello from a Conveyor step; napping {seconds:g} s", flush=True)
time.sleep(seconds)
print("goodbye")
