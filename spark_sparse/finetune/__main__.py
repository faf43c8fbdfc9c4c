"""``python -m spark_sparse.finetune``: fine-tuning and linear evaluation (hydra); the code lives in spark_sparse/finetune/app.py."""

from .app import main

if __name__ == "__main__":
    main()
