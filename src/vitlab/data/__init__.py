"""Official dataset formats, synthetic datasets in the same formats, image ops and shard IO."""
