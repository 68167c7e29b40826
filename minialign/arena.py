"""`python -m minialign.arena`: the command. Its code is minialign.measure.arena."""
import sys

from minialign.measure.arena import main

if __name__ == "__main__":
    sys.exit(main())
