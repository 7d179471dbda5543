"""Shared by every test directory."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread, and on a shared 2-core box spin-waiting
    # threads make each step ~10x slower. Subprocesses inherit OMP_NUM_THREADS.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
