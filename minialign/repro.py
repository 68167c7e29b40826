"""`python -m minialign.repro`: the command. Its code is minialign.kit.repro."""
import sys

from minialign.kit.repro import main

if __name__ == "__main__":
    sys.exit(main())
