"""pytest setup for the generated MoE module.

The module under test is the one `fmoec emit` writes: set FMOEC_MODULE_DIR to the folder that
holds `fmoec_moe.py` (tests/compiler/emit_python.rs renders it into a temporary folder and runs pytest).
"""
import os
import sys

import pytest

MODULE_DIR = os.environ.get('FMOEC_MODULE_DIR')
if not MODULE_DIR or not os.path.isfile(os.path.join(MODULE_DIR, 'fmoec_moe.py')):
    raise pytest.UsageError('set FMOEC_MODULE_DIR to a folder with the generated fmoec_moe.py '
                            '(run `cargo test --no-default-features --test compiler emit_python::`)')
sys.path.insert(0, MODULE_DIR)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
