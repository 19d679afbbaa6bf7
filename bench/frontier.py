"""HILAL's energy frontier from one curvature pass against LionHeart's mapping, priced on the chip model of
hilal.hardware (accuracy, analog tiles, energy and latency per sample).

Usage: python bench/frontier.py [--models A,B] [--seeds 0,1] [--threads T] [--out bench/results/frontier.json]
(the same as `hilal bench frontier --out F`)."""

import sys

from hilal.bench import script

if __name__ == "__main__":
    sys.exit(script("frontier"))
