"""python train.py stage=teacher|pretrain|onpolicy [overrides]  — see README.md and conf/train.yaml."""

from anyflow.train import main

if __name__ == "__main__":
    main()
