"""A torchrun entry point for tests: ``spark_sparse.finetune`` in which every rank sends itself
SIGINT during step $STOP_AT_STEP, as a Ctrl-C that reaches all processes."""

import os
import signal

import spark_sparse.finetune.app as finetune

STEP = int(os.environ["STOP_AT_STEP"])
real_criterion = finetune.criterion


def criterion(cfg):
    loss_fn, calls = real_criterion(cfg), []

    def loss(logits, targets):
        calls.append(1)
        if len(calls) == STEP:
            os.kill(os.getpid(), signal.SIGINT)  # the run stops after this step
        return loss_fn(logits, targets)
    return loss


finetune.criterion = criterion

if __name__ == "__main__":
    finetune.main()
