import os
import sys

# tests/streams.py is shared by the unit and CLI tiers, tests/pairwise.py by the unit and kernel
# tiers.
sys.path.insert(0, os.path.dirname(__file__))
