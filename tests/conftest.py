import os
import sys

# tests/streams.py is shared by the unit and CLI tiers.
sys.path.insert(0, os.path.dirname(__file__))
