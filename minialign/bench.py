"""`python -m minialign.bench`: the command. Its code is minialign.measure.bench."""
import sys

from minialign.measure.bench import main

if __name__ == "__main__":
    sys.exit(main())
