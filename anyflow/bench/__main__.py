"""``python -m anyflow.bench``: see :mod:`anyflow.bench`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from anyflow.bench.suite import run
from anyflow.config import config_dir, register_resolvers

register_resolvers()


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="bench")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
