"""DistributedDataParallel on two CPU ranks (gloo): both ranks end with identical weights,
only rank 0 writes, and the run differs from a single-process run (the ranks really did see
different batches and averaged their gradients)."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from minigpt import checkpoint as ckpt
from tests.test_train import corpus_text, tiny


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, corpus, outs, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from minigpt.train import train

    # Each rank gets its own --out so the test can see which rank wrote files; a real run
    # passes the same directory to all ranks.
    res = train(tiny(corpus, outs[rank], max_iters=6, ckpt_interval=3, eval_interval=3))
    save_file({k: v.contiguous() for k, v in res["model"].state_dict().items()
               if k != "lm_head.weight"}, os.path.join(result_dir, f"rank{rank}.safetensors"))


@pytest.mark.timeout(300)   # a rank stuck in a collective must fail the test, not hang CI
def test_two_cpu_ranks(tmp_path):
    from safetensors.torch import load_file

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text(), encoding="utf-8")
    outs = [str(tmp_path / "out0"), str(tmp_path / "out1")]
    mp.start_processes(_worker, args=(2, _free_port(), str(corpus), outs, str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    w0 = load_file(str(tmp_path / "rank0.safetensors"))
    w1 = load_file(str(tmp_path / "rank1.safetensors"))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # only rank 0 wrote: a checkpoint and logs in its directory, nothing from rank 1
    assert not os.path.exists(outs[1]) or not os.listdir(outs[1])
    ck = ckpt.load_checkpoint(outs[0])
    assert ck["config"]["train"]["step"] == 6 and ck["config"]["train"]["world_size"] == 2
    for k, v in ck["model"].state_dict().items():
        if k != "lm_head.weight":
            assert torch.equal(v, w0[k]), k
    assert (tmp_path / "out0" / "metrics.jsonl").exists()

    # the same run on one process (batches of rank 0 only) ends elsewhere
    from minigpt.train import train
    single = train(tiny(corpus, tmp_path / "single", max_iters=6, ckpt_interval=3,
                        eval_interval=3))
    sd = single["model"].state_dict()
    assert any(not torch.equal(sd[k], w0[k]) for k in w0)


def _nan_eval_worker(rank, world, port, corpus, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from minigpt import train as train_mod

    real = train_mod.estimate_loss

    def nan_at_step_3(model, splits, cfg, *a, **k):  # rank 0 alone evaluates
        out = real(model, splits, cfg, *a, **k)
        nan_at_step_3.calls += 1
        return dict(out, val=float("nan")) if nan_at_step_3.calls == 2 else out

    nan_at_step_3.calls = 0
    train_mod.estimate_loss = nan_at_step_3
    try:
        train_mod.train(tiny(corpus, out, max_iters=6, ckpt_interval=3, eval_interval=3))
        said = "finished"
    except RuntimeError as e:
        said = str(e)
    with open(os.path.join(result_dir, f"said{rank}.txt"), "w") as f:
        f.write(said)


@pytest.mark.timeout(300)
def test_a_nan_evaluation_stops_every_rank(tmp_path):
    # Only rank 0 evaluates: when it alone stopped, rank 1 waited in the next collective
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text(), encoding="utf-8")
    mp.start_processes(_nan_eval_worker,
                       args=(2, _free_port(), str(corpus), str(tmp_path / "out"), str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    for rank in (0, 1):
        said = (tmp_path / f"said{rank}.txt").read_text()
        assert said.startswith("training diverged by step 3 (evaluation loss"), (rank, said)
    assert not (tmp_path / "out" / ckpt.CKPT).exists()  # step 3's save never happened
