"""Shared fixtures.

`fresh_accelerate`: Accelerate keeps one process-wide state (AcceleratorState / PartialState), so a test that
builds a Trainer or runs a fine-tune starts and ends with it reset, and uses one torch thread (the 2 cores
are shared with the rest of the suite; more threads only oversubscribe them). Use it with
`pytestmark = pytest.mark.usefixtures("fresh_accelerate")` or as a test argument.
"""

import pytest
import torch
from accelerate.state import AcceleratorState


@pytest.fixture()
def fresh_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(1)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
