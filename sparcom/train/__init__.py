"""Training with the drift recorded: the SFT pieces train.py wires together and the W&B run
(``sft``), ISN-only training and its matched control (``isn_training``), the run folder and its
rules (``run_folder``: resume, W&B id), the drift record and a run's result (``drift``), and the
snapshots and checkpoints as W&B artifacts (``artifacts``)."""
