import sys
from pathlib import Path

import torch

# Tiny models run fastest on one thread, and two threads per process oversubscribe a 2-core CI machine.
torch.set_num_threads(1)

# tests import their shared helpers as a plain module
sys.path.insert(0, str(Path(__file__).parent))
