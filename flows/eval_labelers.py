"""``python -m flows.eval_labelers``: how often does each labeler agree with human preference pairs?

The same as ``prefsmith eval`` (``flows.cli``); the measuring itself is ``steps.quality``.
"""

import sys

if __name__ == "__main__":
    from flows.cli import eval_labelers_main

    sys.exit(eval_labelers_main())
