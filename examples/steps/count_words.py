"""A small data step: count the words of a text shipped with Python, print the top ones.

The agent passes the hyperparams section "Environment" as environment variables, so
TOP_N can be overridden per task without changing the code.
"""

import codecs
import collections
import contextlib
import io
import os
import re

with contextlib.redirect_stdout(io.StringIO()):
    import this  # the Zen of Python, shipped with every interpreter: our dataset

text = codecs.decode(this.s, "rot13")
top_n = int(os.environ.get("TOP_N", "5"))
words = re.findall(r"[a-z]+", text.lower())
print(f"{len(words)} words, {len(set(words))} distinct")
for word, count in collections.Counter(words).most_common(top_n):
    print(f"{word:>10} {count}")
