"""Row stores behind the bank: choosing one (engine x device), the torch store serving the same
answers as the CPU store through real servers, and a client that stays light."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_same_knn, brute_force_knn, start_server, stop_server

from fgc_bank import connect
from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.stores import ENGINE_ENV, ENGINES, Placement, resolve_engine


def test_placements_resolve_and_refuse_what_cannot_be(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENGINE_ENV, raising=False)  # what auto picks by itself
    assert Placement.resolve("auto", "cpu") == Placement("faiss", "cpu")  # FAISS is installed here
    assert Placement.resolve("torch", "cpu").store.__name__ == "TorchStore"
    for engine, device in (("annoy", "cpu"), ("torch", "tpu"), ("torch", "cuda:99")):
        with pytest.raises(BankError) as info:
            Placement.resolve(engine, device)
        assert info.value.code is ErrorCode.BAD_ARGUMENT
    with pytest.raises(BankError, match="searched by engine 'torch'"):
        resolve_engine("faiss", torch.device("cuda", 0))


def test_faiss_gpu_is_registered_and_refused_with_a_reason_where_it_cannot_run() -> None:
    assert ENGINES["faiss-gpu"] == "fgc_bank.stores.faiss_gpu:FaissGpuStore"
    with pytest.raises(BankError, match="searches a CUDA tensor") as info:
        resolve_engine("faiss-gpu", torch.device("cpu"))
    assert info.value.code is ErrorCode.BAD_ARGUMENT and "\n" not in info.value.message
    import faiss

    if faiss.get_num_gpus() == 0:  # a CPU build of FAISS (as here) on a CUDA device: refused too
        with pytest.raises(BankError, match="needs FAISS built for GPUs") as info:
            resolve_engine("faiss-gpu", torch.device("cuda", 0))
        assert "\n" not in info.value.message


def test_auto_never_picks_faiss_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENGINE_ENV, raising=False)  # the suite may run with FGC_BANK_ENGINE=torch
    for device in (torch.device("cpu"), torch.device("cuda", 0)):  # resolve_engine needs no GPU to answer
        assert resolve_engine("auto", device) == ("faiss" if device.type == "cpu" else "torch")
        monkeypatch.setenv(ENGINE_ENV, "faiss-gpu")  # not even when the environment names it
        assert resolve_engine("auto", device) in ("faiss", "torch")
        monkeypatch.delenv(ENGINE_ENV)


def test_serve_offers_faiss_gpu_and_refuses_it_on_a_cpu_with_one_line() -> None:
    from fgc_bank.cli import serve

    engine = next(p for p in serve.params if p.name == "engine")
    assert set(engine.type.choices) == {"auto", *ENGINES}  # the CLI's list is the registry's
    done = subprocess.run([sys.executable, "-m", "fgc_bank.cli", "serve", "--port", "0", "--engine", "faiss-gpu"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "faiss-gpu" in lines[0] and "Traceback" not in done.stderr, done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA answers")
def test_serve_on_a_missing_gpu_exits_at_once_with_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "fgc_bank.cli", "serve", "--port", "0", "--device", "cuda"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "Traceback" not in done.stderr, done.stderr


def test_a_client_imports_neither_torch_nor_faiss() -> None:
    code = ("import sys, fgc_bank, fgc_bank.client, fgc_bank.protocol; "
            "print(sorted(m for m in ('torch', 'faiss') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_the_torch_store_serves_what_the_cpu_store_serves(tmp_path, rng: np.random.Generator) -> None:
    """Two real servers, one per engine, fed the same ops: same ids (up to float32 ties), same
    scores within rounding, same rows bit for bit after momentum updates."""
    servers = [start_server(tmp_path, "--engine", engine) for engine in ("faiss", "torch")]
    banks = [connect(address) for _, address in servers]
    try:
        for bank, engine in zip(banks, ("faiss", "torch")):
            info = bank.create("feat/7", 3000, 32, seed=4)
            assert info["engine"] == engine and info["device"] == "cpu"
        for step in range(4):
            ids = rng.choice(3000, 128, replace=False)
            features = rng.standard_normal((128, 32)).astype(np.float32)
            results = [bank.knn_update("feat/7", ids, features, 50) for bank in banks]
            assert_same_knn(results[1].scores, results[1].ids, results[0].scores, results[0].ids)
        queries = rng.standard_normal((64, 32)).astype(np.float32)
        rows = [bank.gather("feat/7", np.arange(3000)) for bank in banks]
        assert np.array_equal(rows[0], rows[1])
        scores, ids = banks[1].knn("feat/7", queries, 100)  # unpacks as FAISS's (D, I)
        assert_same_knn(scores, ids, *brute_force_knn(rows[1], queries, 100))
        assert banks[1].stats()["banks"]["feat/7"]["engine"] == "torch"
    finally:
        for bank in banks:
            bank.close()
        for proc, _ in servers:
            stop_server(proc)


def test_torch_in_torch_out_numpy_in_numpy_out() -> None:
    with connect("local://") as bank:
        bank.create("b", 500, 16, seed=2)
        queries = torch.randn(8, 16)
        scores, ids = bank.knn("b", queries, 5)
        assert isinstance(scores, torch.Tensor) and ids.dtype == torch.int64 and ids.device == queries.device
        rows = bank.gather("b", torch.arange(500))
        assert isinstance(rows, torch.Tensor) and rows.shape == (500, 16)
        assert_same_knn(scores.numpy(), ids.numpy(), *brute_force_knn(rows.numpy(), queries.numpy(), 5))
        result = bank.knn_update_async("b", torch.arange(8), queries, 5).result()
        assert isinstance(result.scores, torch.Tensor)
        scores, ids = bank.knn("b", queries.numpy(), 5)
        assert isinstance(scores, np.ndarray) and isinstance(ids, np.ndarray)
