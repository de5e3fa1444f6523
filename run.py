"""Entry point: `python run.py [group=option ...] [key=value ...]` (see README)."""

import sys

from h64lm.cpu_threads import limit_spin_wait

limit_spin_wait()  # before torch is imported: OpenMP reads it once (h64lm/cpu_threads.py)

import hydra
from omegaconf import DictConfig

from h64lm.cli import check_command_line
from h64lm.config import register_configs
from h64lm.runtime.distributed import quiet_hydra_on_nonzero_ranks

register_configs()
quiet_hydra_on_nonzero_ranks()
check_command_line(sys.argv)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from h64lm.cli import main as run_main

    return run_main(cfg)


if __name__ == "__main__":
    main()
