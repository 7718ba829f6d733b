import os
import sys

# Tests import the top-level stage files (tools.py, tasks.py, ...) as modules.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
