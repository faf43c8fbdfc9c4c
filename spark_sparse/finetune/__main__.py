"""``python -m spark_sparse.finetune``: fine-tuning and linear evaluation (hydra); the code lives in spark_sparse/finetune/app.py."""

import sys

try:
    from ..run.cli import command_line
    from .app import main
except KeyboardInterrupt:  # a Ctrl-C while torch and the app load: nothing has started
    sys.exit(130)

if __name__ == "__main__":
    command_line(main, "finetune")
