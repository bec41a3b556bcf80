"""Profile speculative steps per stage: `dspark profile` (dspark/cli_profile_step.py), runnable
from the source tree's bench/ dir without shadowing the installed package.

    python bench/profile_step.py --target out/pair/target --drafter out/pair/dspark \
        --dataset .data/humaneval.jsonl --prompts 4 --max-new-tokens 64 --out $OUT/profile
"""
import sys

from dspark.cli import main

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
