"""The cached stages every embedding pipeline shares (PlantCLEF, FungiCLEF): prepare (images ->
prepared Parquet shards) -> embed (backbone + features -> embedding shards), content-keyed and
resumable (see vitlab.cache). A pipeline's own stages live in its package, e.g.
vitlab.pipelines.plantclef (fit, predict, tiles, score, collages)."""
