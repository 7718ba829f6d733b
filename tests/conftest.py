import os
import sys

# Tests import the top-level stage files (tools.py, tasks.py, ...) as modules.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def scratch_dir(tmp_path_factory):
    """The tiny model with random weights and the shipped tokenizer, saved once as a model directory."""
    import rollout
    import tiny
    model, processor = tiny.build_scratch(seed=0)
    return rollout.save_policy(model, processor, str(tmp_path_factory.mktemp("scratch") / "model"))
