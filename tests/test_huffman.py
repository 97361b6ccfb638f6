"""Entropy-coded size: Huffman code lengths and a tiny layer's coded size, both computed by hand."""

import numpy as np
import torch
from torch import nn

from qpexp.core.accounting import relative_entries, size_bits
from qpexp.core.huffman import coded_layouts, huffman_code_lengths, huffman_record, size_bits_huffman
from qpexp.core.quant import QuantConfig, QuantSpec, quantize_


def test_textbook_huffman_code():
    # CLRS's example: a:45 b:13 c:12 d:16 e:9 f:5 -> a 0, c 100, b 101, d 111, f 1100, e 1101
    freqs = [45, 13, 12, 16, 9, 5]
    lengths = huffman_code_lengths(freqs)
    assert lengths.tolist() == [1, 3, 3, 3, 4, 4]
    assert int((lengths * np.array(freqs)).sum()) == 224


def test_degenerate_alphabets():
    assert huffman_code_lengths([0, 7, 0]).tolist() == [0, 1, 0]  # one symbol still needs a bit
    assert huffman_code_lengths([0, 0]).tolist() == [0, 0]
    assert huffman_code_lengths([1, 1, 2]).tolist() == [2, 2, 1]
    # Kraft: a complete prefix code
    rng = np.random.default_rng(1)
    f = rng.integers(1, 1000, 50)
    assert sum(2.0 ** -huffman_code_lengths(f)) == 1.0


def _sparse_layer_codes():
    # 640 positions, every 16th kept (flat 15, 31, ..., 639): 40 stored codes, 32 x code 3, 8 x code 1
    codes = np.zeros(640, np.int64)
    pos = np.arange(15, 640, 16)
    codes[pos] = 3
    codes[pos[::5]] = 1
    return codes, codes != 0


def test_tiny_layer_layouts_by_hand():
    codes, keep = _sparse_layer_codes()
    lay = coded_layouts(codes, keep, bits=2)  # alphabet 4: a table costs 4 x 5 = 20 bits
    # dense: freqs [600, 8, 0, 32] -> lengths 1, 2, -, 2: 600 + 16 + 64 = 680 + 20 < 1280 fixed; +1
    # bitmask: 640 + values [0, 8, 0, 32] -> lengths 1, 1: 40 + 20 = 60 < 80 fixed; +1
    # relative: 40 gaps, all 15 (one symbol, length 1): 40 + 16 x 5 = 120 < 160 fixed; +1; values 61
    assert lay["options"] == {"dense": 701, "bitmask": 640 + 61, "relative": 121 + 61}
    assert lay["entries"] == 40
    assert lay["values"]["huffman_payload"] == 40 and lay["index"]["huffman_payload"] == 40


def test_fixed_width_kept_when_huffman_does_not_pay():
    # 4 codes 0, 1, 2, 3 at 2 bits: Huffman payload 8 + table 20 > fixed 8: fixed, +1 choice bit
    lay = coded_layouts(np.array([0, 1, 2, 3]), np.array([False, True, True, True]), bits=2)
    assert lay["options"]["dense"] == 8 + 1


def test_model_sizes_and_record_by_hand():
    # one Linear(64, 10) without bias, codebook at 2 bits; the weights of _sparse_layer_codes:
    # code 3 -> +1.0, code 1 -> -1.0 (linear init [-1, 0, 1]; the middle centroid stays empty at 0)
    codes, _ = _sparse_layer_codes()
    w = torch.tensor(np.select([codes == 3, codes == 1], [1.0, -1.0], 0.0), dtype=torch.float32)
    model = nn.Sequential(nn.Linear(64, 10, bias=False))
    model[0].weight.data.copy_(w.reshape(10, 64))
    spec = QuantSpec(bits=2, scheme="codebook", granularity="tensor", symmetric=False)
    quantize_(model, QuantConfig(weight=spec, act=QuantSpec(bits=32)))
    codebook = 3 * 32
    # fixed width: relative 40 x (2 + 4) = 240 + its 2-bit flag (bitmask 720, dense 1280); rowcol: every
    # row and columns 15, 31, 47, 63 live, a full 10 x 4 block, gaps 0 at 1 bit:
    # 10 + 64 + 3 + 40 x (2 + 1) = 197 + its 3-bit flag
    assert size_bits(model) == 197 + 3 + codebook
    # coded: relative 182 (test above) + 2; rowcol 10 + 64 + 3 + gaps (40 x 0 at 1 bit: fixed 40 + 1
    # beats Huffman 40 + 2 x 5) + values (61, as above) = 179 + 3
    assert size_bits_huffman(model) == 179 + 3 + codebook
    rec = huffman_record(model, dense_bits=640 * 32)
    assert rec["final/size_bits_huffman"] == 182 + codebook
    assert rec["final/compression_ratio_huffman"] == 640 * 32 / (182 + codebook)
    assert rec["layers/0/huffman_bits_per_weight"] == 1.0
    assert rec["layers/0/huffman_bits_per_index"] == 1.0
    # the paper's way: weights and indices only against 32 bits a weight, with the Tables' 5-bit
    # indices: every gap is 15 < 32, so 40 entries x (2 + 5) bits; coded: 40 + 40 bits of payload
    assert rec["final/paper_ratio"] == 640 * 32 / 280
    assert rec["final/paper_ratio_huffman"] == 640 * 32 / 80


def test_relative_entries_at_the_papers_five_bit_index():
    # kept flat positions 20 and 41 of 64: gaps 20 and 20. 4 bits (span 16): each gap needs one filler
    # (15, then 4): entries d = [15, 4, 15, 4]; 5 bits (span 32): no filler, d = [20, 20]
    keep = np.zeros(64, bool)
    keep[[20, 41]] = True
    d4, pos4 = relative_entries(keep)
    assert d4.tolist() == [15, 4, 15, 4] and pos4.tolist() == [15, 20, 36, 41]
    d5, pos5 = relative_entries(keep, 5)
    assert d5.tolist() == [20, 20] and pos5.tolist() == [20, 41]
    # a 2-bit codebook layer with these two weights: the paper's count is 2 x (2 + 5) = 14 bits against
    # 64 x 32; qpexp's own file keeps 4-bit gaps: 4 entries x (2 + 4) = 24 bits (+ flag + codebook)
    model = nn.Sequential(nn.Linear(16, 4, bias=False))
    w = torch.zeros(64)
    w[[20, 41]] = torch.tensor([1.0, -1.0])
    model[0].weight.data.copy_(w.reshape(4, 16))
    quantize_(
        model,
        QuantConfig(weight=QuantSpec(bits=2, scheme="codebook", symmetric=False), act=QuantSpec(bits=32)),
    )
    rec = huffman_record(model, dense_bits=64 * 32)
    assert rec["final/paper_ratio"] == 64 * 32 / 14
    assert size_bits(model) == 24 + 2 + 3 * 32


def test_unquantized_layers_count_as_size_bits():
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    assert size_bits_huffman(model) == size_bits(model) == (15 + 3 + 6 + 2) * 32


def test_frontier_size_huffman_ranks_by_the_coded_ratio(tmp_path):
    import json

    import pytest

    from qpexp.callbacks import FrontierCallback
    from qpexp.frontier import write_frontier

    def rec(ratio, seed, cr, cr_h):
        cfg = {"seed": seed, "data": {"name": "mnist"}, "model": {"_target_": "m"}, "baseline": {"epochs": 1}}
        cfg.update(prune={"ratio": ratio, "scope": "global"}, quant={"bits_w": 4}, logger={"kind": "none"})
        return {
            "status": "ok",
            "seed": seed,
            "config": cfg,
            "baseline/test_acc": 0.95,
            "final/val_acc": 0.9,
            "final/test_acc": 0.9,
            "final/compression_ratio": cr,
            "final/compression_ratio_huffman": cr_h,
            "final/size_bits": 1000 / cr,
            "final/size_bits_huffman": 1000 / cr_h,
            "dense/size_bits": 1000,
        }

    # equal accuracy: A is larger than B at fixed width (10x < 11x) but smaller once coded (12x > 11.5x)
    for name, r in {"a": rec(0.8, 0, 10.0, 12.0), "b": rec(0.9, 0, 11.0, 11.5)}.items():
        (tmp_path / "sweep" / name).mkdir(parents=True)
        (tmp_path / "sweep" / name / "record.json").write_text(json.dumps(r))
    honest = write_frontier([tmp_path / "sweep"], tmp_path / "h", wandb=False, quiet=True)
    coded = write_frontier([tmp_path / "sweep"], tmp_path / "c", wandb=False, quiet=True, size="huffman")
    assert [f["ratio"] for f in honest["front"] if f["ratio"] > 1] == [11.0]
    assert [f["ratio"] for f in coded["front"] if f["ratio"] > 1] == [12.0]
    assert coded["size"] == "huffman"
    with pytest.raises(ValueError, match="frontier.size"):
        FrontierCallback(size="entropy")
