"""Launchers that start one esspr-jax command on many processes: a TPU pod slice
(`tpu_pod`), a SLURM GPU cluster (`slurm`) and several local processes
(`local_multiprocess`). Run them as `python -m launch.<name> --help`; each has
`--dry-run`, which prints the exact commands without running anything."""
