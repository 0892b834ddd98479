"""One llama.cpp model load at a time, process-wide.

llama-cpp-python silences a load (``verbose=False``) by pointing the process's
stdout and stderr file descriptors at /dev/null and back. Two loads on two
threads at once (the reply LLM and the turn detector's text model start
together) interleave those swaps and can leave fds 1 and 2 on /dev/null for
good: every later log line and print of the process vanishes.
"""

from __future__ import annotations

import threading
from typing import Any

_LOAD_LOCK = threading.Lock()


def load_llama(**kwargs: Any) -> Any:
    """`llama_cpp.Llama(**kwargs)`, serialised with every other load in the process."""
    from llama_cpp import Llama

    with _LOAD_LOCK:
        return Llama(**kwargs)
