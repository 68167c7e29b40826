"""`python -m minialign.course`: the command. Its code is minialign.kit.course."""
import sys

from minialign.kit.course import main

if __name__ == "__main__":
    sys.exit(main())
