"""h64lm/cpu_malloc.py: with malloc keeping freed memory, a large tensor allocated again after it
was freed costs no page faults once the heap has grown to hold it (after a few rounds, as after a
training loop's first steps); without, every new one is mapped and zero-filled afresh."""

import subprocess
import sys
import textwrap

import pytest

from h64lm import cpu_malloc
from h64lm.config import HardwareConfig
from h64lm.runtime import distributed

_LATER_ALLOCATION_FAULTS = textwrap.dedent("""
    import resource, sys
    import torch
    from h64lm.cpu_malloc import keep_freed_memory
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def fill():  # 64 MiB, written once: each untouched page faults once
        t = torch.empty(16 * 2**20)
        t.fill_(1.0)
        return t
    for _ in range(16):  # as a training loop's first steps: the heap grows to hold what a step uses
        del_me = fill(); del del_me
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        del_me = fill(); del del_me
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _LATER_ALLOCATION_FAULTS, mode], capture_output=True,
                         text=True, check=True, timeout=120)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and Linux's page-fault counts")
def test_a_freed_large_tensor_is_reused_without_page_faults():
    default, keep = _faults("default"), _faults("keep")
    pages = 64 * 2**20 // 4096
    assert default > pages // 2  # mapped afresh: about one fault per 4 KiB page
    assert keep < pages // 20  # reused from the heap


def test_a_libc_without_mallopt_changes_nothing():
    assert cpu_malloc.keep_freed_memory("libdoes-not-exist.so.6") is False


@pytest.mark.parametrize("keep", [True, False])
def test_a_cpu_run_keeps_freed_memory_unless_switched_off(monkeypatch, keep):
    calls = []
    monkeypatch.setattr(distributed, "keep_freed_memory", lambda: calls.append(1) or True)
    distributed.init_distributed(HardwareConfig(device="cpu", keep_freed_memory=keep))
    assert calls == ([1] if keep else [])
