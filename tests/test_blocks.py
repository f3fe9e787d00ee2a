"""Stage 3: packing keeps every token in order, in fixed-length blocks."""

from __future__ import annotations

import pytest

from edgar_tune.config import ConfigError
from tasks.blocks import block_length, pack


def test_pack_cuts_the_concatenation_into_blocks_in_order():
    docs = [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 0]]
    blocks, dropped = pack(docs, 4)
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert dropped == 0
    blocks, dropped = pack(docs, 5)
    assert blocks == [[1, 2, 3, 0, 4], [5, 0, 6, 7, 8]] and dropped == 2


def test_block_length_follows_jumpstart_rule(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(max_position_embeddings=8192).save_pretrained(tmp_path)
    assert block_length(-1, str(tmp_path)) == 1024
    LlamaConfig(max_position_embeddings=512).save_pretrained(tmp_path)
    assert block_length(-1, str(tmp_path)) == 512
    assert block_length(256, str(tmp_path)) == 256
    assert block_length(512, str(tmp_path)) == 512
    # Longer than the context: positions the model never saw, refused with what to set (the CLI prints it)
    with pytest.raises(ConfigError, match=r"tokenize.max_input_length=513 is longer than the model's context \(512 "
                                          r"positions, .*set it to 512 or less, or -1"):  # fmt: skip
        block_length(513, str(tmp_path))


def test_max_train_samples_draws_blocks_without_writing_into_the_tokenize_folder(tmp_path):
    # datasets writes a shuffle's index into the dataset's folder unless told not to: the train stage would write
    # into 03_tokenize, which it only reads. (That folder's digest now leaves datasets' cache files out: counted,
    # such a file moved train's key, and every later run trained again.)
    from datasets import Dataset

    from edgar_tune.config import TrainConfig
    from tasks.cache import folder_digest
    from tasks.finetune import _select_blocks

    Dataset.from_dict({"input_ids": [[i] * 4 for i in range(50)]}).save_to_disk(str(tmp_path / "train"))
    before = (sorted(p.name for p in (tmp_path / "train").iterdir()), folder_digest(tmp_path))
    cfg = TrainConfig(max_train_samples=10, train_data_split_seed=3)
    picked = [row["input_ids"][0] for row in _select_blocks(tmp_path, cfg)]
    assert len(set(picked)) == 10 and picked == [row["input_ids"][0] for row in _select_blocks(tmp_path, cfg)]
    assert picked != list(range(10))  # drawn at random, with the seed
    assert (sorted(p.name for p in (tmp_path / "train").iterdir()), folder_digest(tmp_path)) == before
