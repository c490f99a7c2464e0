from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader

from vitlab.data.shards import embeddings_to_arrow
from vitlab.data.streaming import ParquetStream


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """7 files of uneven sizes, several row groups each; row id in an int column."""
    root = tmp_path_factory.mktemp("stream")
    paths, start = [], 0
    for i, n in enumerate([50, 13, 200, 1, 77, 120, 39]):
        ids = np.arange(start, start + n)
        emb = np.repeat(ids[:, None], 4, axis=1).astype(np.float32)
        table = pa.table({"row_id": ids, "embedding": embeddings_to_arrow(emb)})
        path = root / f"part-{i:05d}.parquet"
        pq.write_table(table, path, row_group_size=32)
        paths.append(path)
        start += n
    return paths, start


def _ids(stream, workers):
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    got = []
    for batch in loader:
        assert (batch["embedding"][:, 0].long() == batch["row_id"]).all()  # columns stay aligned
        got += batch["row_id"].tolist()
    return got


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_row_exactly_once_across_2_workers_x_2_ranks(shards, shuffle):
    paths, total = shards
    seen = Counter()
    for rank in range(2):
        stream = ParquetStream(paths, batch_size=16, shuffle=shuffle, seed=5,
                               rank=rank, world_size=2)  # fmt: skip
        seen.update(_ids(stream, workers=2))
    assert sorted(seen) == list(range(total))
    assert set(seen.values()) == {1}


def test_shuffle_changes_with_epoch_and_is_reproducible(shards):
    paths, total = shards
    stream = ParquetStream(paths, batch_size=32, seed=1)
    first = _ids(stream, 0)
    again = _ids(stream, 0)
    stream.set_epoch(1)
    second = _ids(stream, 0)
    assert first == again and first != second
    assert sorted(first) == sorted(second) == list(range(total))
    assert first != sorted(first)


def test_batches_and_drop_last(shards):
    paths, total = shards
    sizes = [len(b["row_id"]) for b in ParquetStream(paths, batch_size=100, shuffle=False)]
    assert sum(sizes) == total and all(s == 100 for s in sizes[:-1])
    dropped = [len(b["row_id"]) for b in ParquetStream(paths, batch_size=100, drop_last=True)]
    assert set(dropped) == {100}


def test_empty_path_list_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        ParquetStream([])


def test_prepare_deals_images_to_shards_in_random_order(tiny_plantclef, tmp_path):
    """The stream's batches are slices of a permuted row group, so the shards themselves must
    not follow the metadata's (species-by-species) order."""
    from vitlab.data.plantclef import read_training_metadata
    from vitlab.pipelines.plantclef.prepare import prepare_training_images
    from vitlab.stages.prepare import PrepareParams

    csv = tiny_plantclef / "PlantCLEF2024_single_plant_training_metadata.csv"
    stage = prepare_training_images(
        csv, tiny_plantclef / "images_max_side_800", tmp_path, PrepareParams(32, shard_size=40)
    )
    metadata = read_training_metadata(csv)
    first = pq.read_table(stage.shard_paths()[0], columns=["image_name", "species_id"])
    listed = metadata["image_name"].tolist()
    names = first.column("image_name").to_pylist()
    assert names != listed[: len(names)]
    # a random 40 of ~20 species' images span many species, the CSV's first 40 only a few
    first_species = metadata["species_id"].head(len(names)).nunique()
    assert len(set(first.column("species_id").to_pylist())) > first_species
    everything = stage.read_table(columns=["image_name"]).column("image_name").to_pylist()
    assert sorted(everything) == sorted(listed)
