"""HILAL versus LionHeart mapping under one MappingConfig (search, mapping and total time, MAC share, accuracy).

Usage: python bench/search.py [--quick] [--repeats N] [--models A,B] [--threads T] [--out bench/results/search.json]
(the same as `hilal bench search --out F`)."""

import sys

from hilal.bench import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
