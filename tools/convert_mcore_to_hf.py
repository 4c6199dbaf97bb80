#!/usr/bin/env python
"""Megatron-Core -> Hugging Face checkpoint, for people used to Megatron's tools/ scripts.

Same as `solopo convert mcore-to-hf` (see docs/conversion.md):

    python tools/convert_mcore_to_hf.py --checkpoint DIR --output DIR [--max-shard-size 5GB] [--dtype bf16]
"""

import sys

if __name__ == "__main__":
    from megatron_solopo.cli import main

    sys.exit(main(["convert", "mcore-to-hf", *sys.argv[1:]]))
