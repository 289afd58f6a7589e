"""python sample.py nfe=4 [ckpt=PATH] [prompt="…"]  — see README.md and conf/sample.yaml."""

from anyflow.sample import main

if __name__ == "__main__":
    main()
