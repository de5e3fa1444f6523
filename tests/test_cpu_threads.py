"""OpenMP's spin-wait is shortened before torch starts its thread pool, unless the user chose one,
and a run on a loaded machine says so in one line."""

import subprocess
import sys

from h64lm.cpu_threads import SPINCOUNT, limit_spin_wait, starvation_note
from tests.helpers import ROOT


def test_spin_wait_shortened_unless_the_user_chose():
    env = {}
    limit_spin_wait(env)
    assert env == {"GOMP_SPINCOUNT": SPINCOUNT}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        env = dict(chosen)
        limit_spin_wait(env)
        assert env == chosen


def test_run_py_sets_it_before_torch_is_imported():
    probe = ("import sys, os\n"
             "import h64lm.cpu_threads as c\n"
             "real = c.limit_spin_wait\n"
             "c.limit_spin_wait = lambda: (print('torch imported:', 'torch' in sys.modules), real())\n"
             "sys.argv = ['run.py']\n"
             "import run\n"
             "print('GOMP_SPINCOUNT:', os.environ.get('GOMP_SPINCOUNT'))\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["torch imported: False", f"GOMP_SPINCOUNT: {SPINCOUNT}"]


def test_starved_run_says_so_in_one_line():
    note = starvation_note(2, load=5.0, cpus=2)
    assert note is not None and "\n" not in note
    assert "load average 5.0 on 2 CPU(s)" in note and "hardware.num_threads=1" in note
    assert starvation_note(2, load=0.2, cpus=2) is None  # a quiet machine
    assert starvation_note(1, load=9.0, cpus=2) is None  # already one thread
    assert starvation_note(4, load=3.0, cpus=8) is None  # enough cores left
