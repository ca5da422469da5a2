import os

# Tests run on CPU with small thread pools; several ranks share 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
