"""``python -m components.cachetool {list,prune,verify} [--root DIR]``: the feature cache's
command line (:func:`components.cache.main`). A module of its own because ``components``
imports ``components.cache`` on import, and running an already imported module with ``-m``
makes Python warn."""

import sys

from components.cache import main

if __name__ == "__main__":
    sys.exit(main())
