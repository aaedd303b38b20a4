"""hq_data.py: shards (format checks that name the file), the cyclic token stream, the training loader."""
import numpy as np
import pytest
import torch

import hq_data as hd
from conftest import BAD_SHARDS, DATA, GOOD, dist1, smoke_cfg, tg, write_shard


@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
def test_bad_shard_is_an_input_error_naming_the_file(tmp_path, case):
    kw, words = BAD_SHARDS[case]
    path = write_shard(tmp_path / "fineweb_train_000000.bin", **kw)
    with pytest.raises(tg.InputError) as e:
        hd.shard_tokens(str(path), 1024)
    assert str(path) in str(e.value) and words in str(e.value), str(e.value)


def test_missing_shard_file_is_an_input_error(tmp_path):
    with pytest.raises(tg.InputError, match="cannot read"):
        hd.shard_tokens(str(tmp_path / "nope.bin"), 1024)


def test_empty_glob_is_an_input_error(tmp_path):
    with pytest.raises(tg.InputError) as e:
        hd.shard_files(str(tmp_path), "train")
    assert str(tmp_path) in str(e.value) and "no train shards" in str(e.value)


def test_check_shards_reports_the_bad_one(tmp_path):
    good = write_shard(tmp_path / "fineweb_train_000000.bin", GOOD)
    bad = write_shard(tmp_path / "fineweb_train_000001.bin", GOOD, magic=1)
    hd.check_shards([str(good)], 1024, dist1())
    with pytest.raises(tg.InputError) as e:
        hd.check_shards([str(good), str(bad)], 1024, dist1())
    assert str(bad) in str(e.value)


def test_a_step_that_does_not_split_over_the_ranks_is_an_input_error(tmp_path):
    cfg = smoke_cfg(tmp_path)  # 32 sequences per step
    with pytest.raises(tg.InputError, match="TRAIN_BATCH_TOKENS"):
        hd.TrainLoader(cfg, tg.Dist(0, 3, torch.device("cpu")))


@pytest.mark.parametrize("world,cap,m,accum", [(1, 64, 32, 1), (2, 64, 16, 1), (4, 64, 8, 1), (1, 5, 4, 8),
                                               (1, 12, 8, 4), (2, 3, 2, 8), (1, 1, 1, 32)])
def test_micro_batch_is_the_largest_divisor_of_a_ranks_share_within_the_cap(tmp_path, world, cap, m, accum):
    # 32 sequences per step; MICRO_BATCH_SEQS is an upper bound (the h100 preset's 128: 1 GPU 3 x 128, 8 GPUs 1 x 48)
    cfg = smoke_cfg(tmp_path, micro_batch_seqs=cap)
    loader = hd.TrainLoader(cfg, tg.Dist(0, world, torch.device("cpu")))
    assert (loader.m, loader.accum) == (m, accum)
    batches = loader.next_step()
    assert len(batches) == accum and all(x.shape == (m, cfg.train_seq_len) for x, _ in batches)


@pytest.mark.parametrize("world,m,accum", [(1, 128, 3), (2, 96, 2), (4, 96, 1), (8, 48, 1)])
def test_h100_preset_micro_batches(world, m, accum):
    cfg = tg.build_config("h100", flags={"data_path": str(DATA)}, env={})
    loader = hd.TrainLoader(cfg, tg.Dist(0, world, torch.device("cpu")))
    assert (loader.m, loader.accum) == (m, accum)



def test_loader_batches_are_contiguous_and_shifted(tmp_path):
    cfg = smoke_cfg(tmp_path)  # 32 seqs of 128 per step, micro-batches of 16 -> 2 accumulation steps
    loader = hd.TrainLoader(cfg, dist1())
    assert loader.accum == 2
    stream = np.asarray(hd.shard_tokens(str(DATA / "fineweb_train_000000.bin"), 1024)).astype(np.int64)
    for step in range(2):
        batches = loader.next_step()
        flat = torch.cat([x.reshape(-1) for x, _ in batches]).numpy()
        base = step * 4096
        assert np.array_equal(flat, stream[base:base + 4096])
        for x, y in batches:
            assert x.shape == y.shape == (16, 128)
            assert torch.equal(x[:, 1:], y[:, :-1])


def test_loader_state_is_that_of_consumed_steps_despite_read_ahead(tmp_path):
    cfg = smoke_cfg(tmp_path)
    a = hd.TrainLoader(cfg, dist1())
    for _ in range(3):
        a.next_step()  # the worker has read step 4 ahead by now
    assert a.stream.state() == {"shard": 0, "pos": 3 * 4096}
    b = hd.TrainLoader(cfg, dist1())
    b.next_step()  # b has a pending read-ahead of its step 2, which load_state must drop
    b.load_state(a.stream.state())
    for _ in range(2):
        assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a.next_step(), b.next_step()))


def test_token_stream_wraps_across_shards(tmp_path):
    a = write_shard(tmp_path / "a.bin", np.arange(10))
    b = write_shard(tmp_path / "b.bin", np.arange(100, 105))
    s = hd.TokenStream([str(a), str(b)], 1024)
    assert s.read(8, 5).tolist() == [8, 9, 100, 101, 102]
    s.advance(12)
    assert s.state() == {"shard": 1, "pos": 2}
    assert s.read(0, 6).tolist() == [102, 103, 104, 0, 1, 2]
    s2 = hd.TokenStream([str(a), str(b)], 1024)
    s2.load_state(s.state())
    assert s2.read(1, 3).tolist() == s.read(1, 3).tolist()
