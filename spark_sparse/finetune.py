"""``python -m spark_sparse.finetune``: fine-tuning and linear evaluation (hydra); the code lives in spark_sparse/train/finetune.py."""

from .train.finetune import main

if __name__ == "__main__":
    main()
