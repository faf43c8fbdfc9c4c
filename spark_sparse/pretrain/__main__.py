"""``python -m spark_sparse.pretrain``: SparK pretraining (hydra); the code lives in spark_sparse/pretrain/app.py."""

from .app import main

if __name__ == "__main__":
    main()
