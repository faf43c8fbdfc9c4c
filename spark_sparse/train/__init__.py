"""The hydra pretraining app: data, optimisation, checkpoints, logging, pictures, distributed runs, CPU runtime."""
