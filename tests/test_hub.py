"""Pretrained weights: verified download (local HTTP server on 127.0.0.1), cache, offline mode,
concurrency, the shipped digits checkpoints, official-checkpoint conversion, the CLI."""

import argparse
import errno
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import timm
import torch

import spikeformers  # noqa: F401
from spikeformers.models import hub, serialization
from spikeformers.train.hub_cli import convert
from spikeformers.train.hub_cli import main as hub_main

PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """Serves ``files`` with Range support. ``truncate_once`` cuts the first full transfer in half;
    ``stall_once`` sends half of it and then nothing until the server stops; ``ignore_range``
    answers every Range request with the whole file (status 200)."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.truncate_once, self.ignore_range = files, [], False, False
        self.stall_once, self.stopping = False, threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.truncate_once and start == 0:
                    server.truncate_once = False
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # close mid-transfer
                    return
                if server.stall_once and start == 0:
                    server.stall_once = False
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    server.stopping.wait(30)  # a connection that hangs: the client times out
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKEFORMERS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SPIKEFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("SPIKEFORMERS_MIRROR", raising=False)
    return tmp_path / "cache"


def test_download_then_cache_hit(cache):
    with Server({"w.bin": PAYLOAD}) as srv:
        path = hub.download(f"{srv.url}/w.bin", cache / "w.bin", PAYLOAD_SHA)
        assert path.read_bytes() == PAYLOAD
        again = hub.download(f"{srv.url}/w.bin", cache / "w.bin", PAYLOAD_SHA)
        assert again == path and len(srv.requests) == 1, "second call is a cache hit"
    assert not list(cache.glob("*.part"))


def test_hash_mismatch_deletes_and_reports_both_hashes(cache):
    wrong = "0" * 64
    with Server({"w.bin": PAYLOAD}) as srv:
        with pytest.raises(hub.HashMismatchError, match=f"expected {wrong}, got {PAYLOAD_SHA}"):
            hub.download(f"{srv.url}/w.bin", cache / "w.bin", wrong)
    assert not (cache / "w.bin").exists() and not (cache / "w.bin.part").exists()


def test_corrupted_cache_is_replaced(cache):
    cache.mkdir(parents=True)
    (cache / "w.bin").write_bytes(b"not the weights")
    with Server({"w.bin": PAYLOAD}) as srv:
        assert hub.download(f"{srv.url}/w.bin", cache / "w.bin", PAYLOAD_SHA).read_bytes() == PAYLOAD


def test_truncated_transfer_resumes_with_range(cache):
    with Server({"w.bin": PAYLOAD}) as srv:
        srv.truncate_once = True
        path = hub.download(f"{srv.url}/w.bin", cache / "w.bin", PAYLOAD_SHA)
        assert path.read_bytes() == PAYLOAD
        assert srv.requests[0][1] is None and srv.requests[1][1] == f"bytes={len(PAYLOAD) // 2}-"


def test_server_without_range_support_restarts_cleanly(cache):
    with Server({"w.bin": PAYLOAD}) as srv:
        srv.truncate_once, srv.ignore_range = True, True
        assert hub.download(f"{srv.url}/w.bin", cache / "w.bin", PAYLOAD_SHA).read_bytes() == PAYLOAD


def test_leftover_complete_part_file_restarts_cleanly(cache):
    cache.mkdir(parents=True)
    (cache / "w.bin.part").write_bytes(PAYLOAD)  # a previous process died before verifying
    with Server({"w.bin": PAYLOAD}) as srv:
        assert hub.download(f"{srv.url}/w.bin", cache / "w.bin", PAYLOAD_SHA).read_bytes() == PAYLOAD
        assert srv.requests[0][1] == f"bytes={len(PAYLOAD)}-" and srv.requests[1][1] is None


def test_offline_mode_uses_the_cache_only(cache, monkeypatch):
    monkeypatch.setenv("SPIKEFORMERS_OFFLINE", "1")
    with Server({"w.bin": PAYLOAD}) as srv:
        with pytest.raises(hub.OfflineError, match="offline mode .* not in the cache"):
            hub.download(f"{srv.url}/w.bin", cache / "w.bin", PAYLOAD_SHA)
        assert srv.requests == []
        monkeypatch.delenv("SPIKEFORMERS_OFFLINE")
        hub.download(f"{srv.url}/w.bin", cache / "w.bin", PAYLOAD_SHA)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert hub.download(f"{srv.url}/w.bin", cache / "w.bin", PAYLOAD_SHA).read_bytes() == PAYLOAD
        assert len(srv.requests) == 1


def test_concurrent_fetches_of_one_file(cache):
    code = ("import sys; from spikeformers.models import hub; "
            "print(hub.download(sys.argv[1], sys.argv[2], sys.argv[3]))")
    with Server({"w.bin": PAYLOAD}) as srv:
        procs = [subprocess.Popen([sys.executable, "-P", "-c", code, f"{srv.url}/w.bin", str(cache / "w.bin"), PAYLOAD_SHA],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        results = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), results
        assert (cache / "w.bin").read_bytes() == PAYLOAD
        assert len(srv.requests) == 1, "the lock lets one process download; the others hit the cache"


def test_read_only_cache_hit_needs_no_lock(cache):
    cache.mkdir(parents=True)
    (cache / "w.bin").write_bytes(PAYLOAD)
    cache.chmod(0o555)
    try:
        path = hub.download("http://127.0.0.1:9/unused", cache / "w.bin", PAYLOAD_SHA)
        assert path.read_bytes() == PAYLOAD and not (cache / "w.bin.lock").exists()
    finally:
        cache.chmod(0o755)


def test_missing_remote_file_fails_fast(cache):
    with Server({}) as srv:
        with pytest.raises(ConnectionError, match="HTTP 404"):
            hub.download(f"{srv.url}/nope.bin", cache / "nope.bin", PAYLOAD_SHA)
        assert len(srv.requests) == 1  # a 404 is not retried


def test_download_requires_a_hash(cache):
    with pytest.raises(ValueError, match="without a sha256"):
        hub.download("http://127.0.0.1:9/x", cache / "x", "")


# --- shipped digits checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["sdt_tiny.digits", "spikformer_tiny.digits"])
def test_shipped_digits_checkpoint_reproduces_its_accuracy(name, cache):
    from torch.utils.data import DataLoader

    from spikeformers.train.data import Digits, DataInfo
    from spikeformers.train.evaluate import evaluate

    weights = hub.resolve(name)
    assert hub.sha256_of(hub.fetch(name)) == weights.sha256
    model = timm.create_model(name, pretrained=True)
    assert model.in_chans == 1 and model.num_classes == 10
    stats = evaluate(model, DataLoader(Digits(False), batch_size=360), DataInfo("digits", 10, 1, 32), torch.device("cpu"))
    assert stats["top1"] == pytest.approx(weights.top1, abs=0.3)  # the accuracy the registry reports


def test_pretrained_via_mirror_download(cache, monkeypatch):
    name = "sdt_tiny.digits"
    packaged = hub.fetch(name)
    with Server({Path(packaged).name: Path(packaged).read_bytes()}) as srv:
        monkeypatch.setenv("SPIKEFORMERS_MIRROR", srv.url)
        model = timm.create_model(name, pretrained=True)
        assert srv.requests and (cache / Path(packaged).name).exists()
    reference = hub.load_weights(packaged)
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_pretrained_for_finetuning_resets_head_and_adapts_channels(cache):
    model = timm.create_model("sdt_tiny.digits", pretrained=True, num_classes=100, in_chans=3)
    assert model.head.out_features == 100 and model.patch_embed.proj_conv.weight.shape[1] == 3
    reference = hub.load_weights(hub.fetch("sdt_tiny.digits"))
    assert torch.equal(model.block[0].attn.q_conv.weight, reference["block.0.attn.q_conv.weight"])


def test_unconverted_official_weights_explain_what_to_do(cache):
    with pytest.raises(FileNotFoundError, match="spikeformers-hub convert FILE --model sdt_imagenet_8_512"):
        timm.create_model("sdt_imagenet_8_512", pretrained=True)


# --- official checkpoint conversion ------------------------------------------------------------


def _fake_official(reference, config: str) -> dict:
    state = {}
    for key, shape in reference.read_key_list(config):
        state[key] = torch.randint(0, 3, shape) if key.endswith("num_batches_tracked") else torch.randn(shape)
    return state


def test_convert_sdt_timm_saver_checkpoint_round_trip(reference, tmp_path, cache):
    state = _fake_official(reference, "sdt_cifar10_2_256")
    saved = {"epoch": 299, "arch": "sdt", "version": 2, "metric": 95.0,
             "state_dict": {f"module.{k}": v for k, v in state.items()},
             "optimizer": {"state": {}, "param_groups": []}, "args": argparse.Namespace(lr=3e-4, model="sdt")}
    torch.save(saved, tmp_path / "model_best.pth.tar")
    card = convert(tmp_path / "model_best.pth.tar", "sdt_cifar_2_256", tmp_path / "out")
    out = tmp_path / "out" / "sdt_cifar_2_256.converted.safetensors"
    assert card["sha256"] == hub.sha256_of(out) and card["num_classes"] == 10 and card["params"] == 2_567_082
    assert json.loads((tmp_path / "out" / "sdt_cifar_2_256.converted.json").read_text())["sha256"] == card["sha256"]
    model = timm.create_model("sdt_cifar_2_256", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_convert_spikformer_state_dict_and_register(reference, tmp_path, cache, capsys):
    torch.save(_fake_official(reference, "sdt_imagenet_8_384"), tmp_path / "sdt-8-384.pth")
    card = convert(tmp_path / "sdt-8-384.pth", "sdt_imagenet_8_384", tmp_path, name="sdt_imagenet_8_384.in1k", register=True)
    model = timm.create_model("sdt_imagenet_8_384", pretrained=True)  # found through the local registry
    assert hub.sha256_of(Path(card["cached_as"])) == card["sha256"]
    assert model.num_classes == 1000
    assert hub.is_loadable("sdt_imagenet_8_384.in1k") and hub_main(["list"]) == 0
    assert f"sha256  {card['sha256']} (converted on this machine)" in capsys.readouterr().out
    dvs_state = _fake_official(reference, "sf_cifar10dvs_2_256")
    torch.save(dvs_state, tmp_path / "checkpoint_max_test_acc1.pth")
    card = convert(tmp_path / "checkpoint_max_test_acc1.pth", "spikformer_cifar10dvs_2_256", tmp_path)
    assert card["params"] == 2_585_610


def test_convert_rejects_wrong_architecture_and_untrusted_pickles(reference, tmp_path, cache):
    torch.save(_fake_official(reference, "sdt_cifar10_2_256"), tmp_path / "sdt.pth")
    with pytest.raises(ValueError, match=r"does not match spikformer_cifar_4_384: missing \[.*\].*, unexpected \[.*talking_heads"):
        convert(tmp_path / "sdt.pth", "spikformer_cifar_4_384", tmp_path)

    import pathlib

    torch.save({"state_dict": {}, "extra": pathlib.PurePosixPath("x")}, tmp_path / "odd.pth")  # not weights-only safe
    with pytest.raises(ValueError, match="--trust-pickle"):
        convert(tmp_path / "odd.pth", "sdt_cifar_2_256", tmp_path)


def test_cli_list_json_and_verify(tmp_path, capsys, cache):
    assert hub_main(["list", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in records} >= {"sdt_tiny.digits", "spikformer_tiny.digits", "sdt_imagenet_8_512.in1k"}
    assert all(set(r) == {"name", "url_or_file", "sha256", "dataset", "T", "top1", "source"} for r in records)
    path = hub.fetch("sdt_tiny.digits")
    assert hub_main(["verify", str(path), "--name", "sdt_tiny.digits"]) == 0
    (tmp_path / "bad").write_bytes(b"x")
    assert hub_main(["verify", str(tmp_path / "bad"), "--name", "sdt_tiny.digits"]) == 1
    with pytest.raises(SystemExit):
        hub_main(["download", "no_such_model.x"])


# --- streaming, full disk, killed writes, what is advertised --------------------------------------

SMALL = os.urandom(5000)
SMALL_SHA = hashlib.sha256(SMALL).hexdigest()


def test_cut_off_small_file_resumes_from_the_bytes_received(cache):
    # a 1 MiB blocking read lost everything of a small file cut off mid-way: the retry started at 0
    with Server({"s.bin": SMALL}) as srv:
        srv.truncate_once = True
        assert hub.download(f"{srv.url}/s.bin", cache / "s.bin", SMALL_SHA).read_bytes() == SMALL
        assert [r for _, r in srv.requests] == [None, f"bytes={len(SMALL) // 2}-"]


def test_stalled_small_file_resumes_from_the_bytes_received(cache):
    # a blocking 1 MiB read waited for bytes that never came, and the timeout discarded what had
    # arrived (as a kill -9 would): nothing reached the .part file and the retry started at 0
    with Server({"s.bin": SMALL}) as srv:
        srv.stall_once = True
        assert hub.download(f"{srv.url}/s.bin", cache / "s.bin", SMALL_SHA, timeout=1.0).read_bytes() == SMALL
        assert [r for _, r in srv.requests] == [None, f"bytes={len(SMALL) // 2}-"]


def _fill_disk_after_first_piece(response, f, bar):
    f.write(response.read(100))
    f.flush()
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_during_download_names_the_file_and_keeps_the_part(cache, monkeypatch):
    monkeypatch.setattr(hub, "_stream", _fill_disk_after_first_piece, raising=False)
    with Server({"s.bin": SMALL}) as srv:
        with pytest.raises(OSError, match="no space left on device") as info:
            hub.download(f"{srv.url}/s.bin", cache / "s.bin", SMALL_SHA)
        assert len(srv.requests) == 1, "a full disk is not retried"
    message = str(info.value)
    assert message == f"no space left on device while writing {cache / 's.bin.part'}" and info.value.errno == errno.ENOSPC
    assert "s.bin.part is kept" in info.value.hint
    assert not (cache / "s.bin").exists() and (cache / "s.bin.part").read_bytes() == SMALL[:100]


def _half_write_then_full(tmp: Path):
    tmp.write_text("half")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_in_atomic_write_names_the_target_and_keeps_the_previous_file(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("previous")
    with pytest.raises(serialization.NoSpaceError) as info:
        serialization.atomic_write(target, _half_write_then_full)
    assert str(info.value) == f"no space left on device while writing {target}" and "unchanged" in info.value.hint
    assert target.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]


class _FullFile:
    """A file on a full disk: every write fails with ENOSPC."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        pass


def test_full_disk_while_saving_a_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    serialization.save_checkpoint({"epoch": 1}, target)
    monkeypatch.setattr(serialization, "open", _FullFile, raising=False)  # torch's C++ writer would hide the errno
    with pytest.raises(serialization.NoSpaceError, match=f"while writing {target}"):
        serialization.save_checkpoint({"epoch": 2, "w": torch.zeros(1000)}, target)
    assert serialization.load_checkpoint(target)["epoch"] == 1
    safetensors_style = RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                     "message: \"No space left on device\" })")
    with pytest.raises(serialization.NoSpaceError):
        serialization.atomic_write(tmp_path / "w.safetensors", lambda tmp: (_ for _ in ()).throw(safetensors_style))


_SLOW_WRITER = """
import sys, time
from pathlib import Path
from spikeformers.models.serialization import atomic_write
def write(tmp):
    tmp.write_text("partial")
    print("writing", flush=True)
    time.sleep(600)
atomic_write(Path(sys.argv[1]), write)
"""


def _temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def test_temp_file_of_a_killed_write_is_removed_by_the_next_write_never_a_live_one(tmp_path):
    target = tmp_path / "best.pt"
    writer = subprocess.Popen([sys.executable, "-P", "-c", _SLOW_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        [live] = _temp_files(tmp_path)
        serialization.atomic_write(tmp_path / "other.pt", lambda tmp: tmp.write_text("x"))
        serialization.atomic_write(target, lambda tmp: tmp.write_text("mine"))  # same target, writer alive
        assert live.exists(), "the temp file of a live writer is never deleted"
    finally:
        writer.kill()  # kill -9: no cleanup runs
        writer.wait()
    assert live.exists()
    foreign = tmp_path / f".best.pt.otherhost.{writer.pid}.abcdefgh.tmp"  # a pid cannot be checked on another host
    foreign.write_text("?")
    serialization.atomic_write(target, lambda tmp: tmp.write_text("again"))
    assert _temp_files(tmp_path) == [foreign] and target.read_text() == "again"


def test_timm_lists_only_pretrained_tags_that_can_load():
    listed = set(timm.list_pretrained())
    assert {"sdt_tiny.digits", "spikformer_tiny.digits"} <= listed
    for name in hub.REGISTRY:
        assert (name in listed) == hub.is_loadable(name), name
    assert "sdt_imagenet_8_512.in1k" not in listed and not timm.is_model_pretrained("sdt_imagenet_8_512")
    assert "NOT LOADABLE" in timm.models.get_pretrained_cfg("sdt_imagenet_8_512.in1k").notes


def test_cli_list_shows_full_hashes_files_and_sources(capsys, cache):
    assert hub_main(["list"]) == 0
    out = capsys.readouterr().out
    for w in hub.REGISTRY.values():
        assert w.name in out and w.source in out and (w.url or w.filename) in out
        assert (w.sha256 or "convert the official file first") in out


def test_docs_table_lists_every_registered_entry():
    docs = (Path(__file__).parents[1] / "docs" / "pretrained.md").read_text()
    for w in hub.REGISTRY.values():
        assert f"| `{w.name}` |" in docs, w.name


def test_cache_sweep_removes_only_temp_files_of_dead_writers(cache, tmp_path):
    dead = subprocess.run([sys.executable, "-P", "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, host = int(dead.stdout), serialization._HOST
    cache.mkdir(parents=True)
    stale = cache / f".local_registry.json.{host}.{dead_pid}.abcdefgh.tmp"  # a killed register_local
    live = cache / f".x.safetensors.{host}.{os.getpid()}.abcdefgh.tmp"
    foreign = cache / f".x.safetensors.otherhost.{dead_pid}.abcdefgh.tmp"
    for path in (stale, live, foreign, cache / "w.bin.part"):
        path.write_text("?")
    with Server({"s.bin": SMALL}) as srv:
        hub.download(f"{srv.url}/s.bin", cache / "s.bin", SMALL_SHA)
    assert not stale.exists() and live.exists() and foreign.exists() and (cache / "w.bin.part").exists()
