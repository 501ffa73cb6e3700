"""`python -m nanoqwen serve ...`, the same as the `nanoqwen` console script."""
from nanoqwen.cli import main

main()
