"""``python -m winclip_edge.cli``: the same as the ``winclip-edge`` command."""
import sys

from . import main

sys.exit(main())
