#!/usr/bin/env python
"""Hugging Face -> Megatron-Core checkpoint, for people used to Megatron's tools/ scripts.

Same as `solopo convert hf-to-mcore` (see docs/conversion.md):

    python tools/convert_hf_to_mcore.py --hf-model DIR --output DIR [--tp N --pp N] [--dtype bf16]
"""

import sys

if __name__ == "__main__":
    from megatron_solopo.cli import main

    sys.exit(main(["convert", "hf-to-mcore", *sys.argv[1:]]))
