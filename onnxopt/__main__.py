"""``python -m onnxopt`` is the ``onnxopt`` command."""

import sys

from .cli import main

sys.exit(main())
