"""Bounds shared by every way in (CLI options, agent requests, library arguments), so that an absurd
number is one clear error at the door instead of a crash deep inside (an interpreter asked for 10**8
threads dies with a signal). Standard library only: the CLI reads these before anything loads."""

MAX_THREADS = 64  # interpreter threads: more than any board has cores
MAX_TOP_K = 1000  # nearest classes listed per query
MAX_PARALLEL = 256  # boards reached at once from one host
BAUD_RANGE = (50, 4_000_000)  # what UARTs and USB serial adapters do
