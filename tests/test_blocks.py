"""Stage 3: packing keeps every token in order, in fixed-length blocks."""

from __future__ import annotations

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
