"""``python -m facenet_hf.cli``: the ``facenet-hf`` command."""

import sys

from facenet_hf.cli import main

sys.exit(main())
