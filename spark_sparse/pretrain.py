"""``python -m spark_sparse.pretrain``: SparK pretraining (hydra); the code lives in spark_sparse/train/pretrain.py."""

from .train.pretrain import main

if __name__ == "__main__":
    main()
