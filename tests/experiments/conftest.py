import pytest


@pytest.fixture(scope="module")
def base_config():
    """The FAST test config, resolved, as a run's `.hydra/config.yaml` holds it."""
    from omegaconf import OmegaConf

    from tests.helpers import FAST, compose_cfg

    return OmegaConf.to_container(compose_cfg(FAST), resolve=True)
