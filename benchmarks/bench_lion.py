"""Lion steps (lr 1e-4, betas (0.9, 0.99), weight decay 1e-2): every fusedopt backend usable on the device against
lion-pytorch (and its Triton kernel on CUDA) when it imports, and the in-place bandwidth stream with Lion's reads
and writes (20 B/param for the bare step).

The same as `python -m fusedopt.bench --rules lion ...`: every other flag of `python -m fusedopt.bench --help`
applies (models, dtypes, scenarios, device, --out):

    python benchmarks/bench_lion.py --quick --models small-tensors --dtype float32
"""

import sys

from fusedopt.bench import main

if __name__ == "__main__":
    sys.exit(main(["--rules", "lion", *sys.argv[1:]]))
