"""HILAL versus LionHeart mapping under one MappingConfig (search, mapping and total time, MAC share, accuracy).

Usage: python bench/search.py [--quick] [--repeats N] [--models A,B] [--seeds 0,1,2] [--train-seed S] [--threads T]
[--out bench/results/search.json] (the same as `hilal bench search --out F`);
python bench/search.py --criteria F [F ...] prints the per-model criteria table of finished result files
(speed-up, analog MAC share and accuracy against LionHeart, seed by seed)."""

import sys

from hilal.bench import script

if __name__ == "__main__":
    sys.exit(script("search"))
