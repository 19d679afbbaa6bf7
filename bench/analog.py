"""Cost of the aihwkit simulation: all-analog versus digital forward, and one drift evaluation.

Usage: python bench/analog.py [--quick] [--repeats N] [--models A,B] [--threads T] [--out bench/results/analog.json]
(the same as `hilal bench analog --out F`)."""

import sys

from hilal.bench import script

if __name__ == "__main__":
    sys.exit(script("analog"))
