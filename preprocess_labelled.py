"""``preprocess_flare_labelled.py`` under a name that fits any labelled data set (FLARE 2022,
nnU-Net v2 raw, Medical Segmentation Decathlon): the same flags, the same output.

    python preprocess_labelled.py --data_dir nnUNet_raw/Dataset003_Liver --output_dir liver_2d
    python preprocess_labelled.py --data_dir Task09_Spleen --output_dir spleen_2d --val_fraction 0.25 --split_seed 1

See ``python preprocess_labelled.py --help`` and the module docstring of ``preprocess_flare_labelled.py``.
"""

from __future__ import annotations

import argparse

from preprocess_flare_labelled import get_args_parser as _flare_parser
from preprocess_flare_labelled import main
from utils import run_cli

__all__ = ["get_args_parser", "main"]


def get_args_parser() -> argparse.ArgumentParser:
    """The parser of ``preprocess_flare_labelled.py``, named ``preprocess_labelled``."""
    return _flare_parser("preprocess_labelled")


if __name__ == "__main__":
    run_cli(main, get_args_parser())
