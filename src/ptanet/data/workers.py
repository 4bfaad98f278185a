"""Worker-process pools for the data steps (face cropping, synthetic rendering).

Never a plain fork: a forked child inherits OpenCV's and torch's thread pools in a broken state
and hangs in its first threaded OpenCV call (seen in cv2.setNumThreads and cv2.resize) once the
parent has used them. forkserver starts children from a clean server process instead (spawn where
forkserver does not exist); preloading the worker's module saves each pool the re-import.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext


def pool_context(preload: str) -> BaseContext:
    """A multiprocessing context safe after OpenCV/torch have run; ``preload`` = the workers' module."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([preload])
        return context
    return multiprocessing.get_context("spawn")
