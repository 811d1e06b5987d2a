"""``python -m sparse_attention``: see :mod:`sparse_attention.cli`."""

import sys

from .cli import main

sys.exit(main())
