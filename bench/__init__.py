"""kvstore-bench: throughput and lookup figures next to ceilings and peers from the same run."""
