"""Joint curvature pass (traces + ELI of all layers) versus PyHessian run one layer at a time.

Usage: python bench/hessian.py [--quick] [--repeats N] [--models A,B] [--threads T] [--out bench/results/hessian.json]
(the same as `hilal bench hessian --out F`)."""

import sys

from hilal.bench import script

if __name__ == "__main__":
    sys.exit(script("hessian"))
