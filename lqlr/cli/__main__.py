"""``python -m lqlr.cli`` is ``lqlr-compress``."""
from lqlr.cli.compress import main

if __name__ == "__main__":
    main()
