"""zero_ckpt: the checkpoint toolkit for ZeRO-partitioned optimizer state (format v1)."""
