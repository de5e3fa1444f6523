"""What every mode uses besides the model and the data: the process group and devices
(`distributed.py`), the compute precision (`precision.py`), stop signals, seeds and divergence
(`control.py`), the run directory and its lock (`rundir.py`), the console copied to run.log
(`console.py`) and checkpoints (`checkpoint/`). Nothing here imports the trainer."""
